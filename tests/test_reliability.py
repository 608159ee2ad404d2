"""Nothing stale, nothing twice, nothing corrupt (issue 17), on the tiny BERT: a stored result is reused
only under the same run identity; a second live owner is refused; a failed re-run never downgrades a
completed result; a job whose results.json is garbage is re-run; Ctrl-C is recorded as interrupted; every
path that produces a model writes predictions.npz with the group metadata, so a known Δ WGA of 0 gets an
interval that covers 0; bad arguments fail before any training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from subgroup_robustness.results import read_predictions
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import compose, run_in_process, tiny_overrides


@pytest.fixture()
def env(sr_env, tiny_model_dir, redditbias_root, one_thread):
    def overrides(out: str, *extra: str) -> list[str]:
        return tiny_overrides(tiny_model_dir, redditbias_root, sr_env / out, *extra)
    return overrides


def test_same_identity_is_skipped_a_changed_config_is_rerun(env, capsys):
    first = run_in_process(env("job"))
    assert first["status"] == "completed" and "code" in first and first["code"]["version"]
    again = run_in_process(env("job"))
    assert again.get("skipped") is True and again["run_id"] == first["run_id"]
    changed = run_in_process(env("job", "dataset.train.lr=3e-5"))  # same folder, another config
    assert not changed.get("skipped") and changed["run_id"] != first["run_id"]
    out = capsys.readouterr().out
    assert "re-running" in out and "dataset.train.lr" in out


def test_garbage_results_json_is_treated_as_corrupt_and_rerun(env, sr_env, capsys):
    out = sr_env / "garbage"
    out.mkdir()
    (out / "results.json").write_text("null", encoding="utf-8")
    rec = run_in_process(env("garbage"))
    assert rec["status"] == "completed"
    assert "re-running" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_live_owner_elsewhere_is_not_started_twice(env, sr_env):
    from subgroup_robustness.utils.locks import JobLock

    folder = sr_env / "busy"
    holder = JobLock(folder)  # this process holds it; a second owner must be refused
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # another live process holds the lock: the run must return "live elsewhere" without running
    q = ctx.Queue()
    p = ctx.Process(target=_hold_lock, args=(str(folder), q))
    p.start()
    try:
        assert q.get(timeout=60) == "held"
        rec = run_in_process(env("busy"))
        assert rec["status"] == "live_elsewhere" and rec["owner"]["pid"] == p.pid
        assert not (folder / "results.json").exists()
    finally:
        p.terminate()
        p.join(10)
    del holder


def _hold_lock(folder: str, q) -> None:  # pragma: no cover - runs in a child process
    import time

    from subgroup_robustness.utils.locks import JobLock

    lock = JobLock(folder)
    assert lock.acquire()
    q.put("held")
    time.sleep(120)


def test_failed_rerun_never_downgrades_a_completed_result(env, sr_env, monkeypatch):
    first = run_in_process(env("keep"))
    import subgroup_robustness.experiment as ex

    def boom(*a, **k):
        raise RuntimeError("boom: a duplicate's failure")

    monkeypatch.setattr(ex, "prepare", boom)
    with pytest.raises(RuntimeError):
        run_in_process(env("keep", "skip_existing=false"))
    kept = json.loads((sr_env / "keep" / "results.json").read_text())
    assert kept["status"] == "completed" and kept["run_id"] == first["run_id"]
    failures = list((sr_env / "keep").glob("results.failed.*.json"))
    assert len(failures) == 1 and "boom" in json.loads(failures[0].read_text())["error"]["message"]


def test_ctrl_c_is_recorded_as_interrupted(env, sr_env, monkeypatch):
    import subgroup_robustness.experiment as ex

    def interrupted(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1)  # what Lightning does with Ctrl-C inside trainer.fit

    monkeypatch.setattr(ex, "execute", interrupted)
    with pytest.raises(SystemExit):
        run_in_process(env("ctrlc"))
    rec = json.loads((sr_env / "ctrlc" / "results.json").read_text())
    assert rec["status"] == "interrupted"
    monkeypatch.undo()
    assert run_in_process(env("ctrlc"))["status"] == "completed"  # a relaunch re-runs it


def test_bad_arguments_fail_before_any_training(env, sr_env):
    from subgroup_robustness.preflight import check_config

    for bad, needle in [("compressor=pr40 compressor.sparsity=1.5", "sparsity"), ("seed=abc", "seed"),
                        ("data.batch_size=0", "batch_size"), ("compressor=up40 compressor.sparsity=x", "sparsity"),
                        ("compressor=chain compressor.chain=[dq,pr40]", "chain")]:
        cfg = compose(env("bad", *bad.split()))
        with pytest.raises(ConfigError, match=needle):
            check_config(cfg)


def test_base_cache_run_writes_group_metadata_and_a_zero_delta_interval_covers_zero(env, sr_env):
    from subgroup_robustness.report.significance import compare, load_predictions

    a = run_in_process(env("base_a"))                 # trains and stores the base
    b = run_in_process(env("base_b", "seed=1"))       # the same base, reused from the cache
    assert b["base"]["reused"] is True
    for rec in (a, b):
        z = read_predictions(Path(rec["output_dir"]) / "predictions.npz")
        assert "metadata" in z and len(z["metadata"]) == len(z["index"])
        assert "probs" in z and np.allclose(z["probs"].astype(np.float32).sum(1), 1.0, atol=1e-2)
    ds = a["config"]["dataset"]
    pa = load_predictions(Path(a["output_dir"]) / "predictions.npz", ds)
    pb = load_predictions(Path(b["output_dir"]) / "predictions.npz", ds)
    assert pa.masks is not None and pa.masks.shape[1] > 1
    row = compare([(1, pb, pa)], n_boot=500)["per_seed"][0]
    assert row["grouped"] and row["d_wg"] == 0.0
    assert row["d_wg_lo"] <= 0.0 <= row["d_wg_hi"] and not row["d_wg_sig"]


def test_sigterm_is_recorded_as_terminated(env, sr_env, monkeypatch):
    import os
    import signal

    import subgroup_robustness.experiment as ex

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # what scancel / a time limit / the parent watchdog sends
        raise AssertionError("SIGTERM did not stop the job")

    monkeypatch.setattr(ex, "execute", killed)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        run_in_process(env("term"))
    assert info.value.code == 143
    rec = json.loads((sr_env / "term" / "results.json").read_text())
    assert rec["status"] == "terminated" and "SIGTERM" in rec["error"]["message"]
    assert signal.getsignal(signal.SIGTERM) is before  # the job's handler is gone with the job


def test_a_killed_fine_tuning_resumes_from_its_last_finished_epoch(env, sr_env, monkeypatch):
    from subgroup_robustness.metrics import callbacks as cb

    original = cb.EpochCheckpoint.on_train_epoch_end

    def save_then_die(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 1:  # epochs 0 and 1 are finished and saved: the process dies here
            raise RuntimeError("killed after epoch 1")

    monkeypatch.setattr(cb.EpochCheckpoint, "on_train_epoch_end", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_in_process(env("resume", "trainer.max_epochs=3"))
    (ckpt,) = (sr_env / "resume" / "checkpoints").glob("*/base_finetune.ckpt")  # under the run's identity
    assert json.loads((sr_env / "resume" / "results.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    rec = run_in_process(env("resume", "trainer.max_epochs=3"))
    (phase,) = rec["phases"]
    assert rec["status"] == "completed" and phase["resumed_from"] == str(ckpt)
    assert [h["epoch"] for h in phase["history"]] == [0, 1, 2]  # the epochs before the kill are kept
    assert phase["best_epoch"] is not None and 0 <= phase["best_epoch"] <= 2
    assert not (sr_env / "resume" / "checkpoints").exists()  # removed once the job completed


def test_the_selected_epochs_scores_from_the_fit_are_the_evaluation_of_the_chosen_weights(env, sr_env):
    """measure.reuse_fit_scores (default): the chosen weights are not scored again after the fit; their
    validation and test results, predictions and probabilities are the ones scored during the fit at the
    selected epoch, identical to a second pass (measure.reuse_fit_scores=false), and logged alike."""
    runs = {}
    for reuse in (True, False):
        out = f"reuse_{reuse}"
        rec = run_in_process(env(out, "trainer.max_epochs=3", "callbacks.early_stopping=null", "cache_base=false",
                                 "logger=csv", f"measure.reuse_fit_scores={str(reuse).lower()}"))
        assert rec["status"] == "completed"
        with np.load(sr_env / out / "predictions.npz") as z:
            preds = {k: z[k] for k in z.files}
        rows = list(csv.DictReader((sr_env / out / "csv" / "metrics.csv").open()))
        runs[reuse] = rec, preds, rows
    (reused, p1, rows1), (again, p2, rows2) = runs[True], runs[False]
    phase = reused["phases"][0]
    assert len(phase["history"]) == 3 and phase["best_epoch"] is not None
    assert reused["model"]["eval_source"].endswith(f"selected epoch {phase['best_epoch']} (measure.reuse_fit_scores)")
    assert again["model"]["eval_source"] == "validate and test passes"
    assert reused["timing"]["eval"] == 0.0 and again["timing"]["eval"] > 0.0
    assert reused["metrics"] == again["metrics"] and reused["groups"] == again["groups"]
    assert p1.keys() == p2.keys() and {"probs", "pred", "label"} <= p1.keys()
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
    # the selected epoch's test scores in the history are the ones reported
    best = next(h for h in phase["history"] if h["epoch"] == phase["best_epoch"])
    assert best["test"]["test/acc_avg"] == reused["metrics"]["test"]["test/acc_avg"]

    def final(rows):  # the last logged value of every val/ and test/ metric
        out = {}
        for r in rows:
            out.update({k: v for k, v in r.items() if v and k.startswith(("val/", "test/"))})
        return out

    assert final(rows1) == final(rows2) and "test/acc_wg" in final(rows1)


def test_without_the_fits_test_scoring_the_chosen_weights_are_evaluated_after_the_fit(env):
    """history_test=false: the fit never scored the test split, so the evaluation is a validate and test pass."""
    rec = run_in_process(env("no_history_test", "trainer.max_epochs=2", "cache_base=false",
                             "callbacks.group_metrics.history_test=false"))
    assert rec["status"] == "completed" and rec["model"]["eval_source"] == "validate and test passes"
    assert rec["timing"]["eval"] > 0.0 and all("test" not in h for h in rec["phases"][0]["history"])
