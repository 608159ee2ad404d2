"""Selection after the fact: `--selection val/acc_wg` re-picks each run's last fine-tuning epoch from its
history and reports that epoch's test metrics; runs whose epoch cannot be re-picked keep theirs and the
table says why; the rule is printed with every table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.report.fakes import fake_run, history, md_table

GROUPS_E2 = {"biased:female": 0.68, "not_biased:female": 0.9}


def with_phases(folder: Path, phases_of, stages: list | None = None) -> dict:
    """Give a fake run phases whose recorded epoch's test metrics are the run's final ones."""
    path = folder / "results.json"
    rec = json.loads(path.read_text())
    test = rec["metrics"]["test"]
    rec["phases"] = phases_of(test["test/acc_avg"], test["test/acc_wg"])
    if stages is not None:
        rec["compression"]["stages"] = stages
    path.write_text(json.dumps(rec))
    return rec


def phase(name: str, epochs, best: int = 0, monitor: str = "val/acc_avg", groups=None) -> dict:
    return {"phase": name, "epochs": len(epochs), "steps": 10 * len(epochs), "monitor": monitor, "best_epoch": best,
            "best_value": epochs[best][0], "history": history(epochs, groups)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("selection")
    # base seed 1: picked epoch 0 by val/acc_avg; val/acc_wg prefers epoch 2
    fake_run(root / "base-1", seed=1, group_acc=0.8)
    with_phases(root / "base-1", lambda a, w: [phase("base_finetune", [(0.80, 0.50, a, w), (0.78, 0.60, 0.70, 0.65),
                                                                        (0.79, 0.70, 0.72, 0.68)], groups={2: GROUPS_E2})])
    fake_run(root / "base-2", seed=2, group_acc=0.75)  # reused the cached base: no phases, no history
    pruning = [{"name": "head_pruning", "stage": "after", "family": "pruning"}]
    fake_run(root / "pr40-1", compressor="pr40", family="pruning", seed=1, group_acc=0.7)
    with_phases(root / "pr40-1", lambda a, w: [phase("base_finetune", [(0.8, 0.5, 0.8, 0.8), (0.7, 0.9, 0.1, 0.1)]),
                                               phase("finetune_head_pruning", [(0.7, 0.6, 0.5, 0.4), (0.71, 0.65, a, w)],
                                                     best=1)], pruning)
    fake_run(root / "dq-1", compressor="dq", family="quantization", seed=1, group_acc=0.78)
    with_phases(root / "dq-1", lambda a, w: [], [{"name": "dynamic_int8", "stage": "after", "family": "quantization"}])
    fake_run(root / "chain-1", compressor="pr40+dq", family="pruning+quantization", seed=1, group_acc=0.6)
    with_phases(root / "chain-1", lambda a, w: [phase("finetune_head_pruning", [(0.7, 0.5, 0.61, 0.6), (0.6, 0.9, 0.5, 0.5)])],
                pruning + [{"name": "dynamic_int8", "stage": "after", "family": "quantization"}])
    fake_run(root / "qat-1", compressor="qat", family="quantization", seed=1, group_acc=0.74)
    with_phases(root / "qat-1", lambda a, w: [phase("finetune_qat_int8", [(0.7, 0.5, a, w), (0.6, 0.9, 0.5, 0.5)])],
                [{"name": "qat_int8", "stage": "during", "family": "quantization"}])
    # the history does not describe the tested model (its recorded epoch's test metrics differ from the final)
    fake_run(root / "pr60-1", compressor="pr60", family="pruning", seed=1, group_acc=0.7)
    with_phases(root / "pr60-1", lambda a, w: [phase("finetune_head_pruning", [(0.7, 0.5, a - 0.1, w), (0.6, 0.9, 0.5, 0.5)])],
                pruning)
    return root


def report(sweep: Path, out: Path, selection: str | None):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report

    return write_report(sweep, out, n_boot=200, selection=selection, plots=False)


def rec(root: Path, name: str) -> dict:
    return json.loads((root / name / "results.json").read_text())


def test_default_reports_each_runs_own_epoch_and_says_which_rule(sweep, tmp_path):
    report(sweep, tmp_path / "r", None)
    md = (tmp_path / "r" / "tables" / "offline_grid" / "redditbias.md").read_text()
    assert "Model selection: the epoch each fine-tuning picked by its own rule, as run (val/acc_avg)" in md
    rows = md_table(tmp_path / "r" / "tables" / "offline_grid" / "redditbias.md")
    wg = [100 * rec(sweep, f"base-{s}")["metrics"]["test"]["test/acc_wg"] for s in (1, 2)]
    assert rows["base"]["Worst-group acc"].startswith(f"{sum(wg) / 2:.2f} ± ")
    assert not any("‡" in k for k in rows)


def test_acc_wg_rule_re_picks_the_epoch_and_says_what_it_could_not(sweep, tmp_path):
    rep = report(sweep, tmp_path / "r", "val/acc_wg")
    path = tmp_path / "r" / "tables" / "offline_grid" / "redditbias.md"
    rows = md_table(path)
    own2 = rec(sweep, "base-2")["metrics"]["test"]
    assert "base ‡" in rows
    summary = rep["summary"].set_index("setting")
    assert summary.loc["base", "acc_wg_mean"] == pytest.approx((0.68 + own2["test/acc_wg"]) / 2)
    assert summary.loc["base", "acc_avg_mean"] == pytest.approx((0.72 + own2["test/acc_avg"]) / 2)
    # every other run keeps its recorded numbers, for the reason the line gives
    for name, setting in (("dq-1", "dq"), ("chain-1", "pr40+dq"), ("qat-1", "qat"), ("pr60-1", "pr60"), ("pr40-1", "pr40")):
        assert summary.loc[setting, "acc_wg_mean"] == pytest.approx(rec(sweep, name)["metrics"]["test"]["test/acc_wg"])
    text = path.read_text()
    line = text.splitlines()[2]
    assert line.startswith("Model selection: val/acc_wg, re-applied after the fact")
    assert "1 run(s) changed epoch: base seed 1: epoch 0 → 2" in line
    assert "no per-epoch history in results.json: base (seed 2)" in line
    assert "no fine-tuning of its own (a post-training compression of the cached base): dq (seed 1)" in line
    post_fit = line.split("the tested model is not the fine-tuned weights (a step after fine-tuning): ")[1].split(".")[0].split(";")[0]
    assert sorted(post_fit.split(", ")) == ["pr40+dq (seed 1)", "pr60 (seed 1)", "qat (seed 1)"]
    assert "1 run(s) picked the same epoch as run" in line  # pr40: its re-fine-tune's epoch 1 wins either way
    # no interval against a re-picked base (its predictions are of the other epoch); a point Δ still
    assert rows["dq"]["Δ WGA 95% CI"] == "—" and rows["dq"]["Δ WGA"] != "—"
    runs = rep["collection"].runs.set_index("dir")
    assert runs.loc[str(sweep / "base-1"), "selection"] == "changed" and runs.loc[str(sweep / "base-1"), "selected_epoch"] == 2
    # the heatmap's groups are the re-picked epoch's
    groups = rep["collection"].groups()
    got = groups[(groups["setting"] == "base") & (groups["seed"] == 1)].set_index("group")["acc"]
    assert got["biased:female"] == pytest.approx(0.68) and got["not_biased:female"] == pytest.approx(0.9)
    assert "Model selection" in (tmp_path / "r" / "report.md").read_text()


def test_cli_takes_the_rule_and_rejects_others(sweep, tmp_path, capsys):
    from subgroup_robustness.report.__main__ import main

    assert main([str(sweep), "-o", str(tmp_path / "r"), "--n-boot", "100", "--no-plots", "--selection", "val/acc_wg"]) == 0
    out = capsys.readouterr().out
    assert "Model selection: val/acc_wg" in out.replace("\n", " ")
    with pytest.raises(SystemExit) as exc:
        main([str(sweep), "--selection", "val/loss"])
    assert exc.value.code == 2


def test_ties_go_to_the_earliest_epoch():
    from subgroup_robustness.report.selection import reselect

    record = {"metrics": {"test": {"test/acc_avg": 0.5, "test/acc_wg": 0.4}},
              "phases": [phase("finetune", [(0.5, 0.3, 0.5, 0.4), (0.6, 0.7, 0.6, 0.5), (0.55, 0.7, 0.7, 0.6)])]}
    got = reselect(record, "val/acc_wg")
    assert got.changed and got.epoch == 1 and got.test["test/acc_wg"] == 0.5
    assert reselect(record, "val/acc_avg").status == "own"  # the run's own rule: nothing to re-pick
