"""Δ vs the matched-compute control next to Δ vs base (with intervals; a missing control is said, never
dropped), degenerate runs marked and never ranked, and the new metric columns (flips, KL, worst-class
accuracy, the probe's WGA)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from tests.report.fakes import fake_run, md_table

LOW = [0.8] * 5 + [0.45] * 5      # the minority half loses
HIGH = [0.85] * 10


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report

    root = tmp_path_factory.mktemp("controls")
    for s in (1, 2):
        fake_run(root / f"base-{s}", seed=s, group_acc=0.8, probs=True)
        fake_run(root / f"pr40-{s}", compressor="pr40", family="pruning", control="refit", seed=s, group_acc=LOW,
                 rng_seed=10 + s, probs=True, size_mb=70.0,
                 test_metrics={"test/flip_rate": 0.1 * s, "test/kl": 0.02 * s, "test/acc_worst_class": 0.5 + 0.1 * s})
        fake_run(root / f"refit-{s}", compressor="refit", family="control", seed=s, group_acc=HIGH, rng_seed=20 + s)
        fake_run(root / f"vt50-{s}", compressor="vt50", family="vocabulary", control="vtc", seed=s, group_acc=0.8,
                 rng_seed=30 + s, size_mb=60.0)
        fake_run(root / f"distill-{s}", compressor="distill", family="distillation", control="distill_ce", seed=s,
                 group_acc=0.7, rng_seed=40 + s, size_mb=40.0, probe={"probe/acc_avg": 0.75, "probe/acc_wg": 0.6 + 0.1 * s})
        # up80: the largest drop of the grid, but a broken model
        fake_run(root / f"up80-{s}", compressor="up80", family="pruning", control="refit", seed=s, group_acc=[1.0] * 5 + [0.0] * 5,
                 size_mb=50.0, degenerate="predicts 'not_biased' for 100.0% of 600 test examples" if s == 1 else None)
    fake_run(root / "distill_ce-1", compressor="distill_ce", family="control", seed=1, group_acc=0.72, size_mb=40.0)
    out = tmp_path_factory.mktemp("controls_report")
    rep = write_report(root, out, n_boot=400)
    return rep, root


def rec(root: Path, name: str) -> dict:
    return json.loads((root / name / "results.json").read_text())


def test_delta_vs_control_with_interval_next_to_delta_vs_base(report):
    rep, root = report
    rows = md_table(rep["out"] / "tables" / "offline_grid" / "redditbias.md")
    d = [100 * (rec(root, f"pr40-{s}")["metrics"]["test"]["test/acc_wg"] - rec(root, f"refit-{s}")["metrics"]["test"]["test/acc_wg"])
         for s in (1, 2)]
    pr40 = rows["pr40"]
    assert pr40["Control"] == "refit"
    assert pr40["Δ WGA vs control"] == f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}"
    lo, hi = (float(x) for x in pr40["Δ WGA vs control 95% CI"].strip("[]*").split(","))
    assert lo <= statistics.mean(d) <= hi and pr40["Δ WGA vs control 95% CI"].endswith("*")
    assert pr40["Δ WGA 95% CI"].startswith("[")  # and the Δ vs base is still there
    sig = rep["significance"]
    ctrl = sig[(sig["setting"] == "pr40") & (sig["against"] == "control")]
    assert len(ctrl) == 2 and set(ctrl["reference"]) == {"refit"} and ctrl["grouped"].all()
    assert ctrl.set_index("seed")["d_wg"].to_dict() == pytest.approx({1: d[0] / 100, 2: d[1] / 100})
    assert len(sig[(sig["setting"] == "pr40") & (sig["against"] == "base")]) == 2
    # the controls themselves declare none
    assert rows["refit"]["Control"] == "—" and rows["base"]["Control"] == "—"


def test_missing_control_is_said_never_dropped(report):
    rep, _ = report
    rows = md_table(rep["out"] / "tables" / "offline_grid" / "redditbias.md")
    assert rows["vt50"]["Control"] == "vtc (control not run)"
    assert rows["vt50"]["Δ WGA vs control"] == rows["vt50"]["Δ WGA vs control 95% CI"] == "control not run"
    assert rows["vt50"]["Δ WGA"] != "—"  # its Δ vs base is reported as usual
    assert rows["distill"]["Control"] == "distill_ce (1 of 2 seeds)"
    assert rows["distill"]["Δ WGA vs control"] not in ("—", "control not run")
    text = (rep["out"] / "report.md").read_text()
    assert "control not run: vt50 (needs vtc)" in text
    summary = rep["summary"].set_index("setting")
    assert summary.loc["vt50", "control_status"] == "not run" and summary.loc["distill", "control_status"] == "partial"


def test_degenerate_runs_are_marked_and_never_ranked(report):
    rep, _ = report
    out = rep["out"]
    rows = md_table(out / "tables" / "offline_grid" / "redditbias.md")
    assert "up80 †" in rows and "pr40" in rows
    md = (out / "tables" / "offline_grid" / "redditbias.md").read_text()
    assert "† up80 is degenerate (never ranked): seed 1: predicts 'not_biased' for 100.0% of 600 test examples." in md
    sig = rep["significance"]
    up80 = sig[(sig["setting"] == "up80") & (sig["against"] == "base")].set_index("seed")
    assert up80.loc[1, "degenerate"] and "degenerate" in up80.loc[1, "note"] and not up80.loc[2, "degenerate"]
    # the largest drop of the grid is up80's, but the headline never ranks it
    text = (out / "report.md").read_text()
    drop = next(ln for ln in text.splitlines() if ln.startswith("- largest worst-group drop"))
    assert "up80" not in drop and "pr40" in drop
    assert "not ranked, degenerate †: up80" in text
    # hollow in the plot, marked in the heatmap and the flips table (and out of its ranking)
    from subgroup_robustness.report.plots import group_heatmap, wga_vs_size

    summary = rep["summary"]
    fig = wga_vs_size(summary)
    hollow = [ln for ln in fig.axes[0].lines if ln.get_markerfacecolor() == "none" and len(ln.get_xdata())]
    assert [list(ln.get_xdata()) for ln in hollow] == [[50.0]]
    heat = group_heatmap(rep["collection"].groups())
    assert "up80 †" in [t.get_text() for t in heat.axes[0].get_yticklabels()]
    flips = md_table(out / "tables" / "offline_grid" / "redditbias_flips.md", which=1)
    first = next(iter(flips.values()))
    assert "up80 †" in first
    ranking = pd.read_csv(out / "exemplars" / "offline_grid" / "redditbias" / "groups_by_flip_rate.csv")
    ranked = ranking[~ranking["degenerate"]]
    mean = ranked.groupby("group")["flip"].mean().sort_values(ascending=False, kind="stable")
    assert float(first["Mean flip % (non-degenerate)"]) == pytest.approx(100 * mean.max(), abs=0.006)


def test_flip_kl_worst_class_and_probe_columns(report):
    rep, root = report
    rows = md_table(rep["out"] / "tables" / "offline_grid" / "redditbias.md")
    assert rows["pr40"]["Flip %"] == f"{100 * 0.15:.2f} ± {100 * statistics.stdev([0.1, 0.2]):.2f}"
    assert rows["pr40"]["KL"] == f"{0.03:.4f} ± {statistics.stdev([0.02, 0.04]):.4f}"
    assert rows["pr40"]["Worst-class acc"] == f"{100 * 0.65:.2f} ± {100 * statistics.stdev([0.6, 0.7]):.2f}"
    assert rows["distill"]["Probe WGA"] == f"{100 * 0.75:.2f} ± {100 * statistics.stdev([0.7, 0.8]):.2f}"
    assert rows["pr40"]["Probe WGA"] == "—" and rows["base"]["Flip %"] == "—"
    # a run without recorded flips gets them from its predictions against the base of the same seed
    import numpy as np

    flips = []
    for s in (1, 2):
        a, b = (np.load(root / f"{n}-{s}" / "predictions.npz") for n in ("vt50", "base"))
        flips.append(float(np.mean(a["pred"] != b["pred"])))
    assert rows["vt50"]["Flip %"] == f"{100 * np.mean(flips):.2f} ± {100 * np.std(flips, ddof=1):.2f}"


def test_no_probe_column_without_a_probe(tmp_path):
    from subgroup_robustness.report.tables import display_table, summarize
    from subgroup_robustness.report import collect

    fake_run(tmp_path / "base", group_acc=0.8)
    fake_run(tmp_path / "dq", compressor="dq", family="quantization", group_acc=0.7)
    table = display_table(summarize(collect(tmp_path), n_boot=100)[0])
    assert "Probe WGA" not in table and {"Flip %", "KL", "Worst-class acc", "Control"} <= set(table)
