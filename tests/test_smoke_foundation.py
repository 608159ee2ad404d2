from pathlib import Path

from tests.helpers import run_in_process, tiny_overrides


def test_tiny_run_in_process(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out))
    assert rec["status"] == "completed"
    assert (Path(out) / "results.json").exists()
    assert 0.0 <= rec["metrics"]["test"]["test/acc_wg"] <= rec["metrics"]["test"]["test/acc_avg"] <= 1.0
