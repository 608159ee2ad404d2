"""results.json: schema and atomicity."""

import json
import os

import pytest

from subgroup_robustness.results import REQUIRED_KEYS
from subgroup_robustness.utils.io import atomic_write_json
from tests.helpers import run_in_process, tiny_overrides


def test_results_schema(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "seed=3"))
    on_disk = json.loads((out / "results.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in on_disk, key
    assert on_disk["status"] == "completed"
    assert on_disk["run"] == {**on_disk["run"], "dataset": "redditbias", "model": "local", "compressor": "none", "seed": 3}
    test = on_disk["metrics"]["test"]
    groups = on_disk["groups"]["test"]["groups"]
    assert len(groups["acc"]) == 10 and sum(groups["count"].values()) == groups["n"]
    assert test["test/acc_wg"] == min(v for v in groups["acc"].values() if v is not None)
    assert {"test/acc_avg", "test/acc_wg", "test/acc/biased:female", "test/count/biased:female"} <= set(test)
    assert "val/acc_wg" in on_disk["metrics"]["val"]
    assert on_disk["model"]["params"] > 0 and on_disk["model"]["size_mb"] > 0
    assert on_disk["timing"]["base_finetune"] > 0 and on_disk["timing"]["total"] >= on_disk["timing"]["base_finetune"]
    assert on_disk["base"]["reused"] is False and on_disk["phases"][0]["phase"] == "base_finetune"
    assert on_disk["config"]["seed"] == 3
    assert (out / "predictions.npz").exists()
    assert rec["run_id"] == on_disk["run_id"]


def test_completed_run_is_skipped(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    first = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out))
    again = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out))
    assert again.get("skipped") and again["run_id"] == first["run_id"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"status": "completed", "v": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed between writing the temp file and the rename

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"status": "completed", "v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "completed", "v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_unserialisable_record_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}


def test_failed_run_is_recorded(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    with pytest.raises(Exception):
        run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "monitor.metric=val/nope"))
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "failed" and "val/nope" in rec["error"]["message"]
