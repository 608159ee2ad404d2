"""Multi-label runs (ECtHR) in the report: macro-F1 average / worst group / group disparity instead of
accuracy, never an empty accuracy column, significance said to be not computed. Calibration as a factor
(issue 13, item 4): the sources of one method are rows `<method>@<source>` of one table, pooled over seeds,
and a table compares each method across its sources (Δ WGA vs base and vs the natural draw, with CIs)."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.report.fakes import attach_cached_base, calibration_run, fake_run, md_table, multilabel_run

# ---- multi-label ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report

    root = tmp_path_factory.mktemp("ecthr")
    for s in (1, 2):
        multilabel_run(root / f"base-{s}", seed=s, macro={"east": 0.6 + 0.01 * s, "rest": 0.7})
        multilabel_run(root / f"pr40-{s}", seed=s, compressor="pr40", family="pruning", control="refit",
                       macro={"east": 0.5, "rest": 0.68 + 0.01 * s}, size_mb=70.0)
        multilabel_run(root / f"refit-{s}", seed=s, compressor="refit", family="control", macro={"east": 0.55, "rest": 0.7})
    return write_report(root, tmp_path_factory.mktemp("ecthr_report"), n_boot=200), root


def test_multilabel_tables_show_macro_f1_not_accuracy(multilabel):
    rep, root = multilabel
    md = rep["out"] / "tables" / "offline_grid" / "ecthr.md"
    rows = md_table(md)
    assert not any("acc" in c.lower() for c in rows["base"])  # no empty accuracy columns
    base, pr40 = rows["base"], rows["pr40"]
    macro = [json.loads((root / f"pr40-{s}" / "results.json").read_text())["metrics"]["test"] for s in (1, 2)]
    wg = [100 * m["test/macro_f1_wg"] for m in macro]
    assert pr40["Macro-F1 worst group"] == f"{statistics.mean(wg):.2f} ± {statistics.stdev(wg):.2f}"
    gd = [100 * m["test/gd_macro_f1"] for m in macro]
    assert pr40["Macro-F1 group disparity"] == f"{statistics.mean(gd):.2f} ± {statistics.stdev(gd):.2f}"
    assert base["Macro-F1 avg"] == "65.75 ± 0.35" and base["Δ macro-F1 WG"] == "—"
    b = [json.loads((root / f"base-{s}" / "results.json").read_text())["metrics"]["test"]["test/macro_f1_wg"] for s in (1, 2)]
    d = [100 * (m["test/macro_f1_wg"] - x) for m, x in zip(macro, b)]
    assert pr40["Δ macro-F1 WG"] == f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}"
    assert pr40["Δ 95% CI"] == "not computed for multi-label" and base["Δ 95% CI"] == "—"
    assert pr40["Control"] == "refit" and pr40["Δ macro-F1 WG vs control"] == "-5.00 ± 0.00"
    assert "significance not computed for multi-label" in md.read_text()
    assert not len(rep["significance"])  # no bootstrap rows for multi-label runs
    report_md = (rep["out"] / "report.md").read_text()
    assert "largest worst-group macro-F1 drop vs base: pr40 -11.50 (significance not computed for multi-label)" in report_md
    assert "no exemplars — multi-label" in report_md


def test_multilabel_plots_and_console(multilabel, tmp_path, capsys, monkeypatch):
    rep, root = multilabel
    from subgroup_robustness.report.__main__ import main
    from subgroup_robustness.report.plots import group_heatmap, wga_vs_size
    from subgroup_robustness.utils.console import console

    ax = wga_vs_size(rep["summary"]).axes[0]
    assert ax.get_ylabel() == "worst-group macro-F1 (%)"
    assert sorted(t.get_text() for t in ax.texts) == ["base", "pr40", "refit"]
    heat = group_heatmap(rep["collection"].groups())
    assert heat.axes[1].get_ylabel() == "test macro-F1 (%)"
    monkeypatch.setattr(console, "_width", 250)  # no folded cells
    assert main([str(root), "-o", str(tmp_path / "r"), "--n-boot", "100", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Macro-F1 worst group" in out and "Worst-group acc" not in out and "not computed for multi-label" in out


# ---- calibration as a factor -------------------------------------------------------------------------------
LOW = [0.8] * 5 + [0.5] * 5  # the minority half loses 30 points


def calibration_sweep(root, *, base_run: bool = True, sources=("natural", "group_balanced", "worst_group")):
    for s in (1, 2):
        if base_run:
            fake_run(root / f"base-{s}", seed=s, experiment="calibration", group_acc=0.8)
        for src in sources:
            acc = LOW if src == "worst_group" else 0.8
            calibration_run(root / f"wanda50-{src}-{s}", source=src, seed=s, group_acc=acc, rng_seed=7 * s + len(src))
            calibration_run(root / f"sq-{src}-{s}", source=src, compressor="sq", family="quantization", seed=s,
                            group_acc=acc, rng_seed=11 * s + len(src), size_mb=30.0)


def test_sources_are_rows_of_one_table_pooled_over_seeds(tmp_path):
    from subgroup_robustness.report import write_report

    calibration_sweep(tmp_path / "runs")
    rep = write_report(tmp_path / "runs", tmp_path / "r", n_boot=300, plots=False, exemplars=False)
    summary = rep["summary"].set_index("setting")
    assert list(summary.index) == ["base", "wanda50", "wanda50@group_balanced", "wanda50@worst_group", "sq",
                                   "sq@group_balanced", "sq@worst_group"]
    assert (summary["seeds"] == 2).all() and not summary["variant"].astype(bool).any()  # the source is no `{…}` key
    assert (summary.loc[summary.index != "base", "base"] == "base").all()
    assert set(rep["collection"].completed["experiment"]) == {"calibration"}

    frame = rep["calibration"].set_index("setting")
    assert list(frame.index) == ["wanda50", "wanda50@group_balanced", "wanda50@worst_group", "sq", "sq@group_balanced",
                                 "sq@worst_group"]
    worst = frame.loc["wanda50@worst_group"]
    assert worst["source"] == "worst_group" and worst["natural"] == "wanda50"
    assert worst["n_wg_mean"] == pytest.approx(
        summary.loc["wanda50@worst_group", "acc_wg_mean"] - summary.loc["wanda50", "acc_wg_mean"])
    assert worst["n_wg_sig"] and worst["n_wg_lo"] <= worst["n_wg_mean"] <= worst["n_wg_hi"]
    assert worst["d_wg_sig"] and worst["d_wg_mean"] == pytest.approx(summary.loc["wanda50@worst_group", "d_wg_mean"])
    assert not frame.loc["sq@group_balanced", "n_wg_sig"]
    text = (rep["out"] / "tables" / "calibration" / "redditbias_calibration.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| wanda50")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["natural", "group_balanced", "worst_group"]
    assert "(reference)" in lines[0] and lines[2].rstrip(" |").endswith("*")
    report_md = (rep["out"] / "report.md").read_text()
    assert "calibration source vs natural, interval excludes zero: wanda50@worst_group -30.00" in report_md


def test_other_calibration_settings_stay_apart(tmp_path):
    """Runs that differ in more than the source (the number of examples) are never compared as sources."""
    from subgroup_robustness.report import write_report

    calibration_sweep(tmp_path / "runs", sources=("natural", "worst_group"))
    for s in (1, 2):
        calibration_run(tmp_path / "runs" / f"wanda50-128-{s}", source="natural", examples=128, seed=s, group_acc=0.7)
    rep = write_report(tmp_path / "runs", tmp_path / "r", n_boot=200, plots=False, exemplars=False)
    settings = list(rep["summary"]["setting"])
    assert "wanda50 {compressor.calibration.examples=128}" in settings
    assert "wanda50 {compressor.calibration.examples=256}" in settings
    frame = rep["calibration"].set_index("setting")
    assert frame.loc["wanda50@worst_group", "natural"] == "wanda50 {compressor.calibration.examples=256}"
    assert "wanda50 {compressor.calibration.examples=128}" not in frame.index  # no other source of its config


def test_without_a_base_run_the_cached_base_gives_the_interval(tmp_path):
    """experiment=calibration has no base row: Δ vs base against the cached base the runs started from, with
    an interval when its predictions are on this machine, else a point Δ from the recorded metrics."""
    from subgroup_robustness.report import write_report

    runs = tmp_path / "runs"
    calibration_sweep(runs, base_run=False, sources=("natural", "worst_group"))
    caches = {s: tmp_path / "cache" / f"base-{s}" for s in (1, 2)}  # the base cache's folders, with predictions.npz
    for s, folder in caches.items():
        fake_run(folder, seed=s, group_acc=0.8)
    for d in runs.iterdir():
        attach_cached_base(d, caches[int(d.name.rsplit("-", 1)[1])])
    rep = write_report(runs, tmp_path / "r", n_boot=300, plots=False, exemplars=False)
    row = rep["summary"].set_index("setting").loc["wanda50@worst_group"]
    assert row["d_wg_mean"] == pytest.approx(-0.3) and row["d_wg_sig"] and row["d_cached"] == 2
    text = (rep["out"] / "tables" / "calibration" / "redditbias.md").read_text()
    assert "the base run is not in this report; compared with the cached fine-tuned base" in text
    assert rep["calibration"].set_index("setting").loc["wanda50@worst_group", "d_wg_sig"]

    for s in (1, 2):  # the cache is on another machine: a point Δ, no interval
        (caches[s] / "predictions.npz").unlink()
    rep = write_report(runs, tmp_path / "r2", n_boot=300, plots=False, exemplars=False)
    rows = md_table(rep["out"] / "tables" / "calibration" / "redditbias.md")
    assert rows["wanda50@worst_group"]["Δ WGA"] == "-30.00 ± 0.00" and rows["wanda50@worst_group"]["Δ WGA 95% CI"] == "—"


def test_the_calibration_experiment_is_one_report_experiment():
    from tests.helpers import compose

    cfg = compose(["experiment=calibration", "compressor=wanda50", "compressor.calibration.source=worst_group"])
    assert cfg.experiment_name == "calibration" and cfg.compressor.calibration.source == "worst_group"


def test_a_seed_inside_a_stage_list_does_not_split_the_seeds_of_one_row():
    from subgroup_robustness.report.collect import identity

    def rec(seed):
        stages = [{"_target_": "x.Wanda", "calibration": {"source": "natural", "seed": seed}}]
        return {"run": {"seed": seed}, "config": {"seed": seed, "compressor": {"name": "wanda50", "stages": stages}}}

    assert identity(rec(1)) == identity(rec(2))
    other = rec(2)
    other["config"]["compressor"]["stages"][0]["calibration"]["seed"] = 7  # a fixed calibration seed differs
    assert identity(rec(1)) != identity(other)


def test_the_source_inside_the_stages_does_not_split_one_method_across_sources():
    from subgroup_robustness.report.collect import _without_source, identity

    def rec(source):
        stages = [{"_target_": "x.Wanda", "calibration": {"source": source, "examples": 256, "seed": 1}}]
        return {"run": {"seed": 1}, "config": {"seed": 1, "compressor": {
            "name": "wanda50", "calibration": {"source": source, "examples": 256}, "stages": stages}}}

    a, b = identity(rec("natural")), identity(rec("worst_group"))
    assert a != b and _without_source(a) == _without_source(b)
