"""Whole experiments, in process and in seconds, on each paper dataset's official file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.fixtures import (
    civil_rows, mnli_parts, scotus_parts, write_fairlex, write_mnli_local_jsonl, write_wilds_csv,
)
from tests.helpers import REPO, run_in_process

SHARED_DEV = REPO.parent / "shared" / "data" / "multinli" / "dev_matched.jsonl"


def _check(rec, out: Path, n_groups: int):
    assert rec["status"] == "completed"
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    test = rec["metrics"]["test"]
    assert 0.0 <= test["test/acc_wg"] <= test["test/acc_avg"] <= 1.0
    counts = {k: v for k, v in test.items() if k.startswith("test/count/")}
    assert len(counts) == n_groups
    return test


def test_multinli_from_a_local_jsonl(tiny_bert_factory, sr_env):
    rows = [r for part in mnli_parts(120, 60).values() for r in part]
    path = write_mnli_local_jsonl(sr_env / "dev.jsonl", rows)
    out = sr_env / "run"
    rec = run_in_process(_overrides(tiny_bert_factory(3), out, "multinli", f"dataset.source.path={path}"))
    test = _check(rec, out, 6)
    assert sum(test[f"test/count/{g}"] for g in ("contradiction:negation", "contradiction:no_negation",
                                                 "entailment:negation", "entailment:no_negation",
                                                 "neutral:negation", "neutral:no_negation")) == rec["groups"]["test"]["groups"]["n"]


def test_multinli_binary_variant(tiny_bert_factory, sr_env):
    rows = [r for part in mnli_parts(90, 45).values() for r in part]
    path = write_mnli_local_jsonl(sr_env / "dev.jsonl", rows)
    out = sr_env / "run"
    rec = run_in_process(_overrides(tiny_bert_factory(2), out, "multinli_bin02", f"dataset.source.path={path}"))
    test = _check(rec, out, 4)
    assert "test/count/neutral:negation" in test and "test/count/entailment:negation" not in test


def test_civilcomments_reports_all_three_conventions(tiny_bert_factory, sr_env):
    path = write_wilds_csv(sr_env / "all_data_with_identities.csv", civil_rows(140))
    out = sr_env / "run"
    rec = run_in_process(_overrides(tiny_bert_factory(2), out, "civilcomments", f"dataset.source.path={path}"))
    test = _check(rec, out, 4)
    wilds = rec["groups"]["test"]["wilds16"]
    assert test["test/wilds16/acc_wg"] == wilds["acc_wg"] and len(wilds["acc"]) == 16
    assert sum(wilds["count"].values()) >= rec["groups"]["test"]["groups"]["count"]["toxic:identity"]
    # row duplication: the same 16 groups, and the average over one row per (comment, identity)
    rows = rec["groups"]["test"]["rowdup"]
    assert rows["acc"] == wilds["acc"] and rows["rows"] == sum(wilds["count"].values())
    correct = sum(round(a * wilds["count"][g]) for g, a in wilds["acc"].items() if wilds["count"][g])
    assert abs(test["test/rowdup/acc_avg_rows"] - correct / rows["rows"]) < 1e-9
    assert wilds["empty"] == [g for g, c in wilds["count"].items() if not c]


def test_scotus_from_fairlex_files(tiny_bert_factory, sr_env):
    folder = write_fairlex(sr_env / "scotus", scotus_parts())
    out = sr_env / "run"
    rec = run_in_process(_overrides(tiny_bert_factory(11), out, "scotus", f"dataset.source.path={folder}",
                                    "dataset.truncation_side=left"))
    _check(rec, out, 22)
    assert rec["config"]["dataset"]["truncation_side"] == "left"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DEV.exists(), reason="the real MultiNLI dev-matched file is not next to the repo")
def test_real_multinli_with_real_minilm(sr_env):
    """The real model on real MultiNLI rows: a fast dev run (two batches per phase)."""
    out = sr_env / "run"
    rec = run_in_process(["dataset=multinli", f"dataset.source.path={SHARED_DEV}", "debug=fdr", "logger=none",
                          "print_config=false", "callbacks.progress=null", f"hydra.run.dir={out}"])
    _check(rec, out, 6)
    assert rec["model"]["params"] > 20_000_000


def _overrides(model_dir, out, dataset, *extra):
    from tests.data.fixtures import run_overrides

    return run_overrides(model_dir, out, dataset, *extra)
