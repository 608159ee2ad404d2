"""Never misleading: runs are pooled as seeds only when their run identity minus the seed agrees (else
separate rows naming the differing keys, each compared with its own configuration's base), rows from
different code versions are flagged, error bars stay within [0, 100] and plot labels never overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from tests.report.fakes import fake_run

TINY = {"trainer": {"max_epochs": 1}, "dataset": {"subsample": {"train": 1000, "val": 300, "test": 500}}}
FDR = {"trainer": {"max_epochs": 1, "limit_train_batches": 2},
       "dataset": {"subsample": {"train": 256, "val": 128, "test": 128}}}


def test_a_fast_dev_run_is_never_pooled_with_real_seeds(tmp_path):
    """The issue's case: a debug=fdr run was pooled as an extra seed of the debug=tiny rows."""
    from subgroup_robustness.report import write_report

    for s in (1, 2):
        fake_run(tmp_path / f"tiny-base-{s}", seed=s, group_acc=0.8, config=TINY)
        fake_run(tmp_path / f"tiny-pr40-{s}", compressor="pr40", family="pruning", seed=s, group_acc=0.7, config=TINY)
    fake_run(tmp_path / "fdr-base-3", seed=3, group_acc=0.5, config=FDR)
    fake_run(tmp_path / "fdr-pr40-3", compressor="pr40", family="pruning", seed=3, group_acc=0.45, config=FDR)
    rep = write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False, exemplars=False)
    summary = rep["summary"].set_index("setting")
    tiny = "dataset.subsample.test=500, dataset.subsample.train=1000, dataset.subsample.val=300, +1 more"
    fdr = "dataset.subsample.test=128, dataset.subsample.train=256, dataset.subsample.val=128, +1 more"
    assert list(summary.index) == [f"base {{{fdr}}}", f"base {{{tiny}}}", f"pr40 {{{fdr}}}", f"pr40 {{{tiny}}}"] or \
        set(summary.index) == {f"base {{{tiny}}}", f"base {{{fdr}}}", f"pr40 {{{tiny}}}", f"pr40 {{{fdr}}}"}
    assert summary.loc[f"base {{{tiny}}}", "seed_list"] == "1,2" and summary.loc[f"base {{{fdr}}}", "seed_list"] == "3"
    assert summary.loc[f"base {{{fdr}}}", "variant"].endswith("trainer.limit_train_batches=2")
    assert summary.loc[f"base {{{tiny}}}", "variant"].endswith("trainer.limit_train_batches=<absent>")
    # each configuration is compared with its own base: 0.45 - 0.5, not against the tiny base
    assert summary.loc[f"pr40 {{{fdr}}}", "base"] == f"base {{{fdr}}}"
    assert summary.loc[f"pr40 {{{fdr}}}", "d_wg_mean"] == pytest.approx(0.45 - 0.5)
    assert summary.loc[f"pr40 {{{tiny}}}", "d_wg_mean"] == pytest.approx(0.7 - 0.8)
    md = (tmp_path / "report" / "tables" / "offline_grid" / "redditbias.md").read_text()
    assert "never pooled" in md and "trainer.limit_train_batches=2" in md


def test_seed_derived_and_ignored_keys_do_not_split_a_row(tmp_path):
    from subgroup_robustness.report import write_report

    for s in (1, 2, 3):  # data.seed follows the seed; tags and num_workers do not change a result
        fake_run(tmp_path / f"base-{s}", seed=s, group_acc=0.8,
                 config={"data": {"seed": s, "num_workers": s}, "tags": [f"t{s}"], "trainer": {"max_epochs": 3}})
    # one setting, two compressor configurations: two rows, named by the compressor key that differs
    same = {"data": {"seed": 1}, "trainer": {"max_epochs": 3}}
    fake_run(tmp_path / "pr40-a", compressor="pr40", family="pruning", seed=1, config={**same, "compressor": {"sparsity": 0.4}})
    fake_run(tmp_path / "pr40-b", compressor="pr40", family="pruning", seed=1, config={**same, "compressor": {"sparsity": 0.3}})
    summary = write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False, exemplars=False)["summary"]
    assert list(summary["setting"]) == ["base", "pr40 {compressor.sparsity=0.3}", "pr40 {compressor.sparsity=0.4}"]
    assert summary.set_index("setting").loc["base", "seeds"] == 3
    # both still find the base: the context (everything but compressor/model/objective and seed) agrees
    assert (summary.set_index("setting").loc[["pr40 {compressor.sparsity=0.3}", "pr40 {compressor.sparsity=0.4}"],
                                              "base"] == "base").all()


def test_rows_from_different_code_versions_are_flagged(tmp_path):
    from subgroup_robustness.report import write_report

    a = {"version": "0.1.0", "git_commit": "a" * 40, "dirty": False}
    b = {"version": "0.1.0", "git_commit": "b" * 40, "dirty": True}
    fake_run(tmp_path / "base", code=a)
    fake_run(tmp_path / "dq", compressor="dq", family="quantization", code=a)
    fake_run(tmp_path / "pr40", compressor="pr40", family="pruning", code=b)
    write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False, exemplars=False)
    md = (tmp_path / "report" / "tables" / "offline_grid" / "redditbias.md").read_text()
    assert ("Code versions differ between the runs of this table (version@commit, +dirty: local changes) — "
            "0.1.0@aaaaaaaa: base, dq; 0.1.0@bbbbbbbb+dirty: pr40.") in md
    same = tmp_path / "same"
    fake_run(same / "base", code=a)
    fake_run(same / "dq", compressor="dq", family="quantization", code=a)
    write_report(same, same / "report", n_boot=100, plots=False, exemplars=False)
    assert "Code versions differ" not in (same / "report" / "tables" / "offline_grid" / "redditbias.md").read_text()


# ---- plots ----------------------------------------------------------------------------------------------
# the committed offline grid's 18 settings (size MB, WGA %), plus its controls and encoder-only variants:
# a dozen points share x = 90.9 MB
GRID = [("base", "none", 90.9, 40.1), ("distill", "distillation", 69.58, 44.4), ("distill_l2", "distillation", 62.48, 21.1),
        ("pr20", "pruning", 88.14, 56.3), ("pr40", "pruning", 85.38, 59.2), ("pr60", "pruning", 82.43, 53.5),
        ("pr80", "pruning", 79.67, 45.1), ("up20", "pruning", 90.9, 56.3), ("up40", "pruning", 90.9, 50.0),
        ("up60", "pruning", 90.9, 0.0), ("up80", "pruning", 90.9, 0.0), ("dq", "quantization", 58.73, 38.7),
        ("sq", "quantization", 58.76, 40.1), ("qat", "quantization", 58.73, 41.5), ("vt100", "vocabulary", 90.9, 57.0),
        ("vt75", "vocabulary", 79.18, 50.0), ("vt50", "vocabulary", 67.46, 50.0), ("vt25", "vocabulary", 55.73, 47.2),
        ("refit", "control", 90.9, 55.6), ("vtc", "control", 90.9, 52.1), ("distill_ce", "control", 69.58, 43.0),
        ("distill_l2_ce", "control", 62.48, 22.5), ("up20e", "pruning", 90.9, 56.0), ("up40e", "pruning", 90.9, 51.4),
        ("up60e", "pruning", 90.9, 48.6), ("up80e", "pruning", 90.9, 42.3)]


def grid_summary(std: float = 0.04) -> pd.DataFrame:
    return pd.DataFrame([{"setting": s, "setting_name": s, "family": f, "size_mb": mb, "acc_wg_mean": wg / 100,
                          "acc_wg_std": std, "degenerate": s in ("up60", "up80")} for s, f, mb, wg in GRID])


def test_labels_of_the_committed_grid_do_not_overlap(tmp_path):
    from subgroup_robustness.report.plots import wga_vs_size

    fig = wga_vs_size(grid_summary(), "offline_grid: redditbias", tmp_path / "plot.png")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text().rstrip(" †") for t in labels) == sorted(s for s, *_ in GRID)
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, without its leader line
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (labels[i].get_text(), labels[j].get_text())
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.array([[mb, wg] for _, _, mb, wg in GRID]))
    for t, box in zip(labels, boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
        assert not any(box.contains(x, y) for x, y in points), t.get_text()  # no label hides a point
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_error_bars_stay_within_0_and_100():
    from subgroup_robustness.report.plots import clipped_yerr, wga_vs_size

    err = clipped_yerr(pd.Series([2.0, 98.0, 50.0, 40.0]), pd.Series([10.0, 10.0, 10.0, np.nan]))
    assert err.tolist() == [[2.0, 10.0, 10.0, 0.0], [10.0, 2.0, 10.0, 0.0]]
    summary = grid_summary(std=0.3)  # a std of 30 points around 0 % and 59 %
    fig = wga_vs_size(summary)
    ys = np.concatenate([np.asarray(seg)[:, 1] for c in fig.axes[0].collections for seg in c.get_segments()])
    assert len(ys) and ys.min() >= 0.0 and ys.max() <= 100.0


def test_cache_folders_do_not_split_a_row(tmp_path):
    """The same run on another machine keeps its caches elsewhere: still one row."""
    from subgroup_robustness.report import write_report

    for s in (1, 2):
        fake_run(tmp_path / f"base-{s}", seed=s, config={"data": {"cache_dir": f"/home/user{s}/.cache/sr"},
                                                         "dataset": {"source": {"cache_dir": f"/scratch/{s}/data"}}})
    summary = write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False, exemplars=False)["summary"]
    assert list(summary["setting"]) == ["base"] and summary["seeds"].iloc[0] == 2
