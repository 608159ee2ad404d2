"""The report on a results folder built here (with a failed and a still-running job): every table value is
the mean ± std the test computes itself, deltas are per-seed differences against the base, intervals mark
the large effect and not the null one, and the PNGs are real images."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import write_fake_run

BASE_ACC = [0.9, 0.85, 0.88, 0.9, 0.8, 0.75, 0.7, 0.8, 0.72, 0.78]
PR40_ACC = [a - 0.05 if i < 5 else a - 0.35 for i, a in enumerate(BASE_ACC)]  # minority groups collapse


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for s in (1, 2, 3):
        write_fake_run(root / f"redditbias/seed={s},setting=base", seed=s,
                       group_acc=[a - 0.02 * (s - 2) for a in BASE_ACC])
        write_fake_run(root / f"redditbias/seed={s},setting=pr40", compressor="pr40", family="pruning", seed=s,
                       size_mb=80.1, params=20.1e6, group_acc=PR40_ACC)
        # dq: the base's accuracy in every group, placed on other examples: no real change
        write_fake_run(root / f"redditbias/seed={s},setting=dq", compressor="dq", family="quantization", seed=s,
                       size_mb=30.2, params=12e6, group_acc=BASE_ACC, rng_seed=100 + s)
    write_fake_run(root / "redditbias/seed=1,setting=bert_mini", model="bert_mini", seed=1, size_mb=44.7,
                   params=11.2e6, group_acc=0.5)
    write_fake_run(root / "redditbias/seed=1,setting=vt50", compressor="vt50", family="vocabulary", seed=1,
                   status="failed")
    write_fake_run(root / "redditbias/seed=1,setting=vt25", compressor="vt25", family="vocabulary", seed=1,
                   status="running")
    return root


@pytest.fixture(scope="module")
def report(results_dir, tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report.__main__ import main

    out = tmp_path_factory.mktemp("report")
    assert main([str(results_dir), "-o", str(out), "--n-boot", "1000"]) == 0
    return out


def records(results_dir: Path, setting: str) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted(results_dir.rglob("results.json"))
            if p.parent.name.endswith(f"setting={setting}")]
    return sorted(recs, key=lambda r: r["run"]["seed"])


def md_rows(path: Path) -> dict[str, dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def test_table_values_are_mean_and_std_over_seeds(report, results_dir):
    rows = md_rows(report / "tables" / "offline_grid" / "redditbias.md")
    assert list(rows) == ["base", "bert_mini", "pr40", "dq"]  # Table 1 order; failed/running jobs absent
    for setting in ("base", "pr40", "dq"):
        recs = records(results_dir, setting)
        wg = [100 * r["metrics"]["test"]["test/acc_wg"] for r in recs]
        avg = [100 * r["metrics"]["test"]["test/acc_avg"] for r in recs]
        assert rows[setting]["Worst-group acc"] == f"{statistics.mean(wg):.2f} ± {statistics.stdev(wg):.2f}"
        assert rows[setting]["Avg acc"] == f"{statistics.mean(avg):.2f} ± {statistics.stdev(avg):.2f}"
        assert rows[setting]["Seeds"] == "3"
        assert rows[setting]["Size (MB)"] == f"{recs[0]['model']['size_mb']:.2f}"
    # the change against the base is taken seed by seed
    base = records(results_dir, "base")
    pr40 = records(results_dir, "pr40")
    d = [100 * (p["metrics"]["test"]["test/acc_wg"] - b["metrics"]["test"]["test/acc_wg"]) for p, b in zip(pr40, base)]
    assert rows["pr40"]["Δ WGA"] == f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}"
    assert rows["bert_mini"]["Seeds"] == "1" and rows["bert_mini"]["Family"] == "distillation"
    assert rows["bert_mini"]["Worst-group acc"] == "50.00"  # one seed: no std

    summary = pd.read_csv(report / "summary.csv").set_index("setting")
    wg = [r["metrics"]["test"]["test/acc_wg"] for r in pr40]
    assert summary.loc["pr40", "acc_wg_mean"] == pytest.approx(np.mean(wg))
    assert summary.loc["pr40", "acc_wg_std"] == pytest.approx(np.std(wg, ddof=1))
    assert summary.loc["pr40", "size_vs_base"] == pytest.approx(80.1 / 90.9)


def test_large_drop_is_marked_and_null_change_is_not(report):
    rows = md_rows(report / "tables" / "offline_grid" / "redditbias.md")
    assert rows["pr40"]["Δ WGA 95% CI"].endswith("]*") and rows["pr40"]["Δ avg 95% CI"].endswith("]*")
    assert rows["dq"]["Δ WGA 95% CI"].endswith("]") and not rows["dq"]["Δ WGA 95% CI"].endswith("*")
    lo, hi = (float(x) for x in rows["pr40"]["Δ WGA 95% CI"].strip("[]*").split(","))
    assert hi < 0 and lo <= -35 + 10  # a drop of ~35 points, well away from zero
    sig = pd.read_csv(report / "significance.csv")
    per_seed = sig[sig["setting"] == "pr40"]
    assert len(per_seed) == 3 and per_seed["d_wg_sig"].all() and per_seed["grouped"].all()
    assert (per_seed["d_wg_lo"] <= per_seed["d_wg"]).all() and (per_seed["d_wg"] <= per_seed["d_wg_hi"]).all()


def test_failed_and_running_jobs_are_listed_not_fatal(report):
    runs = pd.read_csv(report / "runs.csv")
    assert sorted(runs["status"].value_counts().items()) == [("completed", 10), ("failed", 1), ("running", 1)]
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert failed["setting"] == "vt50" and "boom" in failed["error"]
    text = (report / "report.md").read_text()
    assert "## Failed" in text and "vt50" in text and "## Not finished" in text and "vt25" in text


def test_size_table_and_pngs(report):
    sizes = md_rows(report / "tables" / "offline_grid" / "sizes.md")
    assert sizes["dq"]["Size (MB)"] == "30.20" and sizes["dq"]["Params (M)"] == "12.00"
    assert sizes["base"]["vs base"] == "100.0%"
    html = (report / "tables" / "offline_grid" / "redditbias.html").read_text()
    assert "<table" in html and "pr40" in html
    for name in ("wga_vs_size_redditbias.png", "group_heatmap_redditbias.png"):
        png = report / "plots" / "offline_grid" / name
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_groups_table_matches_records(report, results_dir):
    from subgroup_robustness.report import collect

    col = collect(results_dir)
    groups = col.groups()
    rec = records(results_dir, "pr40")[0]
    got = groups[(groups["setting"] == "pr40") & (groups["seed"] == 1)].set_index("group")["acc"].to_dict()
    assert got == pytest.approx(rec["groups"]["test"]["groups"]["acc"])


def test_mid_sweep_without_any_completed_run_and_bad_paths(tmp_path):
    from subgroup_robustness.report import write_report
    from subgroup_robustness.report.collect import NoResultsError

    write_fake_run(tmp_path / "sweep" / "a", status="running")
    (tmp_path / "sweep" / "b").mkdir()
    (tmp_path / "sweep" / "b" / "results.json").write_text("{ half a fi")  # a file being copied
    rep = write_report(tmp_path / "sweep", n_boot=200)
    assert sorted(rep["collection"].runs["status"]) == ["running", "unreadable"] and rep["tables"] == []
    assert "## Not finished" in (tmp_path / "sweep" / "report" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoResultsError, match="no results.json"):
        write_report(tmp_path / "empty", n_boot=200)
    with pytest.raises(NoResultsError, match="does not exist"):
        write_report(tmp_path / "missing", n_boot=200)


def test_cli_reports_a_missing_folder_clearly(tmp_path, capsys):
    from subgroup_robustness.report.__main__ import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_each_row_is_compared_with_the_right_base(tmp_path):
    from subgroup_robustness.report import write_report

    runs = {
        "base": dict(), "pr40": dict(compressor="pr40", family="pruning"),
        "dq": dict(compressor="dq", family="quantization"),
        "bert_mini": dict(model="bert_mini", group_acc=0.6),                      # a checkpoint as is
        "bert_mini+pr40": dict(model="bert_mini", compressor="pr40", family="pruning", group_acc=0.5),
        "base_dro": dict(objective="group_dro", group_acc=0.7),
        "pr40_dro": dict(compressor="pr40", family="pruning", objective="group_dro", group_acc=0.6),
    }
    for name, kw in runs.items():
        write_fake_run(tmp_path / name, **{"group_acc": 0.8, **kw})
    rep = write_report(tmp_path, n_boot=200, plots=False)
    table = rep["summary"].set_index("setting")
    assert table["base"].to_dict() == {
        "base": "", "pr40": "base", "dq": "base", "bert_mini": "base", "bert_mini+pr40": "bert_mini",
        "base [group_dro]": "", "pr40 [group_dro]": "base [group_dro]"}
    assert table.loc["bert_mini+pr40", "d_avg_mean"] == pytest.approx(0.5 - 0.6)
    assert table.loc["pr40 [group_dro]", "d_avg_mean"] == pytest.approx(0.6 - 0.7)
    assert table.loc["bert_mini", "d_avg_mean"] == pytest.approx(0.6 - 0.8)


# ---- row order and colours come from the data ---------------------------------------------------------
def test_rows_follow_the_experiments_sweep_list(tmp_path):
    """The paper's grid comes out in Table 1's order whatever the sizes, from the sweep list Hydra records
    next to each job (.hydra/hydra.yaml) or results.json's `sweep`; unlisted rows follow their family's."""
    import yaml

    from subgroup_robustness.report import write_report
    from tests.helpers import CONF

    def sweep_list(exp: str) -> list[str]:
        return yaml.safe_load((CONF / "experiment" / f"{exp}.yaml").read_text())["hydra"]["sweeper"]["params"]

    paper = sweep_list("paper")
    kd = {"bert_medium", "bert_small", "bert_mini", "bert_tiny", "distilbert", "tinybert6", "tinybert4"}
    families = {"pr": "pruning", "up": "pruning", "dq": "quantization", "sq": "quantization", "qa": "quantization",
                "vt": "vocabulary", "di": "distillation"}
    names = paper["setting"].split(",")
    for i, name in enumerate(names + ["distill"]):  # sizes that alone would give another order
        kw = {} if name == "base" else {"model": name} if name in kd else {"compressor": name,
                                                                               "family": families[name[:2]]}
        folder = tmp_path / "paper" / name
        write_fake_run(folder, experiment="paper", size_mb=10.0 + (7 * i) % 23, **kw)
        if name != "distill":  # run outside the grid: no sweep list
            (folder / ".hydra").mkdir()
            (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": paper}}}))
    offline = sweep_list("offline_grid")["setting"].split(",")
    controls = {"refit", "vtc", "distill_ce", "distill_l2_ce"}  # the matched-compute controls in the grid
    for i, name in enumerate(offline):
        kw = {} if name == "base" else {"compressor": name,
                                        "family": "control" if name in controls else families[name[:2]]}
        path = tmp_path / "offline" / name / "results.json"
        write_fake_run(path.parent, size_mb=90.0 - (5 * i) % 17, **kw)
        rec = json.loads(path.read_text())
        rec["sweep"] = {"params": sweep_list("offline_grid")}
        path.write_text(json.dumps(rec))
    summary = write_report(tmp_path, n_boot=20, plots=False)["summary"]
    got = {exp: list(part["setting"]) for exp, part in summary.groupby("experiment")}
    assert got["paper"] == [*names[:8], "distill", *names[8:]]  # Table 1, the unlisted student with its family
    by_family = ["base", "refit", "vtc", "distill_ce", "distill_l2_ce", "distill", "distill_l2",
                 *[n for n in offline if n[:2] in ("pr", "up")],
                 "dq", "sq", "qat", "vt100", "vt75", "vt50", "vt25"]
    assert got["offline_grid"] == by_family  # families together, each in the sweep's order


def test_a_new_setting_and_family_get_a_row_and_a_colour(tmp_path):
    """A compressor no code knows (family `wanda`), with no sweep list: a row in its own family's block,
    ordered by size within the name stem, and a colour of its own in the plots."""
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report
    from subgroup_robustness.report.plots import FAMILY_COLORS, PALETTE, family_color, family_colors

    runs = {"base": {}, "pr40": dict(compressor="pr40", family="pruning", size_mb=80.0),
            "dq": dict(compressor="dq", family="quantization", size_mb=30.0),
            "wanda40": dict(compressor="wanda40", family="wanda", size_mb=60.0),
            "wanda20": dict(compressor="wanda20", family="wanda", size_mb=70.0),
            "ffn50": dict(compressor="ffn50", family="structured", size_mb=50.0)}
    for name, kw in runs.items():
        write_fake_run(tmp_path / name, **kw)
    rep = write_report(tmp_path, n_boot=50)
    assert list(rep["summary"]["setting"]) == ["base", "pr40", "dq", "ffn50", "wanda20", "wanda40"]
    rows = md_rows(tmp_path / "report" / "tables" / "offline_grid" / "redditbias.md")
    assert list(rows) == ["base", "pr40", "dq", "ffn50", "wanda20", "wanda40"] and rows["wanda40"]["Family"] == "wanda"
    assert list(md_rows(tmp_path / "report" / "tables" / "offline_grid" / "sizes.md")) == list(rows)
    colors = family_colors(rep["summary"]["family"])
    assert colors["wanda"] in PALETTE and colors["wanda"] == family_color("wanda")
    assert len(set(colors.values())) == len(colors)  # one colour per family in the figure
    assert {f: colors[f] for f in ("none", "pruning", "quantization")} == {
        f: FAMILY_COLORS[f] for f in ("none", "pruning", "quantization")}
    assert family_colors(["wanda"]) == {"wanda": family_color("wanda")}  # the same in every figure
    assert (tmp_path / "report" / "plots" / "offline_grid" / "wga_vs_size_redditbias.png").stat().st_size > 10_000
    groups = rep["collection"].groups()
    assert list(dict.fromkeys(groups.sort_values("row_order")["setting"])) == list(rows)
