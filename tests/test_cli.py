"""The real entry point, ``python -m subgroup_robustness``, run from an unrelated directory."""

import json

from tests.helpers import run_cli


def test_tiny_run_through_cli_from_another_directory(tiny_model_dir, redditbias_root, tmp_path):
    proc = run_cli(["model=local", f"model.path={tiny_model_dir}", f"dataset.source.root={redditbias_root}",
                    "trainer.max_epochs=2", "trainer.precision=32-true", "seed=7"],
                   cwd=tmp_path, env={"SR_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "worst-group" in out and "average" in out and "biased:muslim" in out
    found = list((tmp_path / "logs" / "train" / "runs").glob("*/results.json"))
    assert len(found) == 1
    rec = json.loads(found[0].read_text())
    assert rec["status"] == "completed" and rec["run"]["seed"] == 7
    assert (found[0].parent / "csv" / "metrics.csv").exists()  # CSV logs always


def test_unknown_option_lists_the_choices(tmp_path):
    proc = run_cli(["dataset=nope"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "Could not find 'dataset/nope'" in err and "Available options in 'dataset'" in err and "redditbias" in err


def test_offline_hub_model_fails_fast_with_one_line(tmp_path):
    proc = run_cli(["model=bert_base", "print_config=false"], cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "SR_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "bert-base-uncased" in proc.stdout and "model=minilm_l6" in proc.stdout
