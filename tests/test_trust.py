"""Answers a lab can defend (issue 12), end to end on the tiny BERT: matched controls train exactly like the
setting they control; compressed runs carry per-group flips and KL against their base; a degenerate model
is flagged; dq is the paper's torch.ao dynamic int8; QAT fine-tunes in fp32; per-epoch history is saved;
the DFR probe reports its own worst-group accuracy."""

from __future__ import annotations

import pytest

from tests.helpers import compose, run_in_process, tiny_overrides


@pytest.fixture()
def run(sr_env, tiny_model_dir, redditbias_root, one_thread):
    def go(out: str, *extra: str):
        return run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, sr_env / out, *extra))
    return go


def _fit_phases(rec):
    return [p for p in rec["phases"] if p["phase"] != "base_finetune"]


def test_refit_trains_like_the_pruning_refinetune_it_controls(run):
    pr = run("pr40", "compressor=pr40", "trainer.max_epochs=2")
    refit = run("refit", "compressor=refit", "trainer.max_epochs=2")
    (a,), (b,) = _fit_phases(pr), _fit_phases(refit)
    assert a["phase"] == "finetune_head_pruning" and b["phase"] == "finetune_refit"
    for key in ("epochs", "steps", "monitor", "precision"):
        assert a[key] == b[key], key
    assert len(a["history"]) == len(b["history"]) == 2
    assert refit["model"]["params"] == refit["base"]["figures"]["params"]  # nothing removed
    assert pr["config"]["compressor"]["control"] == "refit"


def test_compressed_run_has_flips_and_kl_per_group_against_its_base(run):
    rec = run("pr40", "compressor=pr40")
    test = rec["metrics"]["test"]
    groups = [g for g, n in rec["groups"]["test"]["groups"]["count"].items() if n]
    for g in groups:
        for key in ("flip", "flip_c2w", "flip_w2c", "kl"):
            assert f"test/{key}/{g}" in test, (key, g)
        assert test[f"test/flip/{g}"] == pytest.approx(test[f"test/flip_c2w/{g}"] + test[f"test/flip_w2c/{g}"])
    assert 0.0 <= test["test/flip_rate"] <= 1.0 and test["test/kl"] >= 0.0
    assert "test/acc_worst_class" in test and "test/acc_mean_group" in test
    assert rec["comparison"]["against"].startswith("cached base")
    base = run("base", "compressor=none")
    assert "test/flip_rate" not in base["metrics"]["test"] and base["comparison"]["against"] is None


def test_zeroed_head_is_flagged_degenerate(run):
    rec = run("up80", "compressor=up80")
    assert rec["degenerate"]["degenerate"] is True
    assert any("zeros" in r or "predicts" in r for r in rec["degenerate"]["reasons"])


def test_dq_is_the_papers_torch_ao_dynamic_int8_by_default(sr_env, tiny_model_dir, redditbias_root, run):
    cfg = compose(tiny_overrides(tiny_model_dir, redditbias_root, sr_env / "x", "compressor=dq"))
    assert cfg.compressor.backend == "torch.ao"
    rec = run("dq", "compressor=dq")
    assert rec["model"]["weight_dtypes"].get("torch.qint8", 0) > 0


def test_qat_fine_tunes_in_fp32_by_default(run):
    rec = run("qat", "compressor=qat", "trainer.precision=bf16-mixed")
    (phase,) = _fit_phases(rec)
    assert phase["precision"] == "32-true"


def test_probe_reports_worst_group_accuracy_of_a_refit_head(run):
    rec = run("probe", "compressor=none", "analysis.probe=true")
    assert 0.0 <= rec["metrics"]["probe"]["probe/acc_wg"] <= 1.0
    assert rec["probe"]["held_out"] == "val" and rec["probe"]["settings"]
