"""Per-language reporting (issue 14, item 6): worst-group accuracy inside each language per setting, its
change against the base with paired-bootstrap intervals recomputed from the predictions, for the run's own
test set and for extra test sets (eval_datasets), and the per-language plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.report.fakes import FAKE_XNLI, md_table, multilingual_run


def acc(base: float, drops: dict[str, float]):
    """Accuracy per (language, label, negation): ``base``, minus ``drops[language]`` on the negation groups."""
    return lambda lang, label, neg: base - (drops.get(lang, 0.0) if neg else 0.0)


def more(drops: dict[str, float]) -> dict:
    return {"xnli_more": {"accuracy": acc(0.8, drops), "languages": ["de", "en", "fr", "sw"]}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report

    root = tmp_path_factory.mktemp("languages")
    for s in (1, 2):
        multilingual_run(root / f"base-{s}", seed=s, rng_seed=s, accuracy=acc(0.8, {}), extra=more({}))
        # pr40: Swahili's negation groups lose 30 points (own test and extra set); German a little in seed 2
        multilingual_run(root / f"pr40-{s}", compressor="pr40", family="pruning", seed=s, rng_seed=10 + s, size_mb=85.0,
                         accuracy=acc(0.8, {"sw": 0.3, "de": 0.05 * (s - 1)}), extra=more({"sw": 0.3}))
        multilingual_run(root / f"dq-{s}", compressor="dq", family="quantization", seed=s, rng_seed=20 + s, size_mb=58.0,
                         accuracy=acc(0.8, {}), extra=more({}))
        # up80: the largest drop, but a broken model
        multilingual_run(root / f"up80-{s}", compressor="up80", family="pruning", seed=s, rng_seed=30 + s,
                         accuracy=acc(0.5, {"en": 0.5}), extra=more({}),
                         degenerate="predicts 'entailment' for 100.0% of the test examples" if s == 1 else None)
    out = tmp_path_factory.mktemp("languages_report")
    return write_report(root, out, n_boot=400), root


def rec(root: Path, name: str) -> dict:
    return json.loads((root / name / "results.json").read_text())


def test_a_table_of_worst_group_accuracy_per_language_and_setting(report):
    rep, root = report
    md = rep["out"] / "tables" / "offline_grid" / "xnli_languages.md"
    wga = md_table(md, 0)
    assert list(wga) == ["base", "pr40", "up80 †", "dq"]  # the dataset table's row order
    assert set(wga["base"]) == {"Setting", "Size (MB)", "Seeds", "de (n=240)", "en (n=240)", "sw (n=240)"}
    for setting, cell in (("pr40", "pr40"), ("up80", "up80 †")):
        for lang in ("de", "en", "sw"):
            v = [100 * rec(root, f"{setting}-{s}")["metrics"]["test"][f"test/lang_{lang}/acc_wg"] for s in (1, 2)]
            assert wga[cell][f"{lang} (n=240)"] == f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
    assert wga["pr40"]["sw (n=240)"].startswith("50.00")
    # the 12 XNLI languages no run was tested on are left out, and named
    text = md.read_text()
    assert "Languages without test examples in these runs (left out): ar, bg, el, es, fr, hi" in text
    assert "† up80 is degenerate" in text


def test_the_change_per_language_has_a_paired_bootstrap_interval(report):
    rep, root = report
    d = md_table(rep["out"] / "tables" / "offline_grid" / "xnli_languages.md", 1)
    assert list(d) == ["pr40", "up80 †", "dq"] and d["pr40"]["Base"] == "base"
    sw = d["pr40"]["sw"]
    assert sw.startswith("-30.00 [") and sw.endswith("]*")   # excludes zero
    lo, hi = (float(x) for x in sw.split("[")[1].rstrip("]*").split(","))
    assert lo <= -30.0 <= hi
    assert not d["dq"]["sw"].endswith("*") and not d["pr40"]["en"].endswith("*")
    langs = rep["languages"]
    row = langs[(langs["test_set"] == "test") & (langs["setting"] == "pr40") & (langs["language"] == "de")].iloc[0]
    deltas = [rec(root, f"pr40-{s}")["metrics"]["test"]["test/lang_de/acc_wg"]
              - rec(root, f"base-{s}")["metrics"]["test"]["test/lang_de/acc_wg"] for s in (1, 2)]
    assert row["d_wg_mean"] == pytest.approx(statistics.mean(deltas))
    assert row["d_wg_std"] == pytest.approx(statistics.stdev(deltas)) and row["ci_seeds"] == 2
    assert (rep["out"] / "languages.csv").is_file()


def test_extra_test_sets_get_their_own_per_language_table(report):
    rep, _ = report
    md = rep["out"] / "tables" / "offline_grid" / "xnli_xnli_more_languages.md"
    assert "(test_xnli_more)" in md.read_text()
    wga, d = md_table(md, 0), md_table(md, 1)
    assert set(wga["base"]) >= {"de (n=240)", "en (n=240)", "fr (n=240)", "sw (n=240)"}  # French only here
    assert d["pr40"]["sw"].startswith("-30.00") and d["pr40"]["sw"].endswith("*")
    assert d["pr40"]["fr"].startswith("+0.00")


def test_degenerate_rows_are_never_the_headline(report):
    rep, _ = report
    text = (rep["out"] / "report.md").read_text()
    section = text.split("## Per language")[1].split("##")[0]
    assert "offline_grid / xnli (test): largest per-language worst-group drop: pr40 in sw -30.00" in section
    assert "up80" not in section  # its -80 points in English are a broken model's


def test_the_per_language_plot(report):
    rep, _ = report
    from subgroup_robustness.report.plots import wga_by_language

    plots = {p.name for p in rep["plots"]}
    assert {"wga_by_language_xnli.png", "wga_by_language_xnli_xnli_more.png"} <= plots
    part = rep["languages"][rep["languages"]["test_set"] == "test"]
    fig = wga_by_language(part)
    ax = fig.axes[0]
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert entries[:3] == ["de", "en", "sw"] and "degenerate (hollow, never ranked)" in entries
    labels = sorted(t.get_text() for t in ax.texts if t.get_text())
    assert labels == ["base", "dq", "pr40", "up80 †"]  # each setting named once
    assert (rep["out"] / "plots" / "offline_grid" / "wga_by_language_xnli.png").stat().st_size > 10_000


def test_groups_are_rebuilt_from_the_config_the_extra_set_was_scored_with(tmp_path):
    """No config recorded for the extra test set: re-composed from the run's eval_datasets entry (the real
    conf/dataset/xnli.yaml, whose groups match); a recorded config that does not reproduce the recorded
    numbers costs the interval, never the table, and is named."""
    from subgroup_robustness.report import write_report

    paths = {"paths": {"data_dir": str(tmp_path / "data"), "log_dir": str(tmp_path / "logs")}}
    for s in (1, 2):
        multilingual_run(tmp_path / "a" / f"base-{s}", seed=s, rng_seed=s, accuracy=acc(0.8, {}),
                         extra={"xnli": {"accuracy": acc(0.8, {}), "languages": ["de", "sw"]}},
                         record_extra_config=False, config=paths)
        multilingual_run(tmp_path / "a" / f"pr40-{s}", compressor="pr40", family="pruning", seed=s, rng_seed=10 + s,
                         accuracy=acc(0.8, {}), extra={"xnli": {"accuracy": acc(0.8, {"sw": 0.4}), "languages": ["de", "sw"]}},
                         record_extra_config=False, config=paths)
    rep = write_report(tmp_path / "a", tmp_path / "ra", n_boot=200, plots=False, exemplars=False)
    d = md_table(rep["out"] / "tables" / "offline_grid" / "xnli_xnli_languages.md", 1)
    assert d["pr40"]["sw"].startswith("-40.00 [") and d["pr40"]["sw"].endswith("*"), rep["problems"]

    # a recorded config whose languages are in another order: the rebuilt groups give other numbers
    wrong = {**FAKE_XNLI, "attributes": {**FAKE_XNLI["attributes"],
                                         "language": list(reversed(FAKE_XNLI["attributes"]["language"]))}}
    for d_ in (tmp_path / "a").iterdir():
        r = json.loads((d_ / "results.json").read_text())
        r["eval_datasets"]["xnli"]["dataset_config"] = wrong
        (d_ / "results.json").write_text(json.dumps(r))
    rep = write_report(tmp_path / "a", tmp_path / "rb", n_boot=200, plots=False, exemplars=False)
    d = md_table(rep["out"] / "tables" / "offline_grid" / "xnli_xnli_languages.md", 1)
    assert d["pr40"]["sw"] == "-40.00"  # the recorded Δ stands, without an interval
    assert any("lang_sw groups of test_xnli rebuilt from its config" in p for p in rep["problems"])


def test_a_missing_extra_predictions_file_costs_only_its_intervals(tmp_path):
    from subgroup_robustness.report import write_report

    for s in (1,):
        multilingual_run(tmp_path / f"base-{s}", seed=s, accuracy=acc(0.8, {}), extra=more({}))
        multilingual_run(tmp_path / f"pr40-{s}", compressor="pr40", family="pruning", seed=s, rng_seed=9,
                         accuracy=acc(0.8, {"sw": 0.3}), extra=more({"sw": 0.3}))
    (tmp_path / "pr40-1" / "predictions_xnli_more.npz").unlink()
    rep = write_report(tmp_path, tmp_path / "r", n_boot=200, plots=False, exemplars=False)
    extra = md_table(rep["out"] / "tables" / "offline_grid" / "xnli_xnli_more_languages.md", 1)
    own = md_table(rep["out"] / "tables" / "offline_grid" / "xnli_languages.md", 1)
    assert extra["pr40"]["sw"] == "-30.00" and own["pr40"]["sw"].startswith("-30.00 [")
    assert any("predictions_xnli_more.npz: missing" in p for p in rep["problems"])
