"""The bootstrap intervals on synthetic predictions with a known effect: they cover the true difference at
about the nominal rate, exclude zero when the effect is large, mostly include it when there is none, and
pair examples by id (not by position)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subgroup_robustness.report import significance as sig

SIZES = np.array([400, 300, 150, 80])           # group sizes; the last group is the minority
P_BASE = np.array([0.90, 0.85, 0.80, 0.70])     # base accuracy per group
DROP = np.array([0.01, 0.01, 0.02, 0.15])       # the compressed model loses most on the minority


def simulate(rng, drop=DROP):
    groups = np.repeat(np.arange(len(SIZES)), SIZES)
    masks = np.eye(len(SIZES), dtype=bool)[groups]
    base = rng.random(len(groups)) < P_BASE[groups]
    comp = rng.random(len(groups)) < (P_BASE - drop)[groups]
    return comp, base, masks


def truth(drop=DROP):
    """Expected Δ given the group sizes: average over examples, and the worst group's change."""
    d_avg = float(-(SIZES * drop).sum() / SIZES.sum())
    d_wg = float((P_BASE - drop).min() - P_BASE.min())
    return d_avg, d_wg


def test_interval_covers_the_true_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    t_avg, t_wg = truth()
    cover_avg = cover_wg = 0
    reps = 150
    for i in range(reps):
        comp, base, masks = simulate(rng)
        res = sig.paired_bootstrap(comp, base, masks, n_boot=400, seed=i)
        lo, hi = sig.interval(res["samples"][:, 0])
        cover_avg += lo <= t_avg <= hi
        lo, hi = sig.interval(res["samples"][:, 1])
        cover_wg += lo <= t_wg <= hi
    # nominal 95%; the worst group is well separated here, so its minimum behaves like one group's accuracy
    assert cover_avg / reps >= 0.88, cover_avg / reps
    assert cover_wg / reps >= 0.85, cover_wg / reps


def test_large_effect_excludes_zero_and_no_effect_mostly_does_not():
    rng = np.random.default_rng(1)
    comp, base, masks = simulate(rng, drop=np.array([0.0, 0.0, 0.0, 0.30]))
    res = sig.paired_bootstrap(comp, base, masks, n_boot=2000, seed=0)
    lo, hi = sig.interval(res["samples"][:, 1])
    assert hi < 0 and sig.excludes_zero(lo, hi)
    assert lo <= res["d_wg"] <= hi
    false_alarms = 0
    for i in range(60):
        comp, base, masks = simulate(rng, drop=np.zeros(4))
        res = sig.paired_bootstrap(comp, base, masks, n_boot=300, seed=i)
        false_alarms += sig.excludes_zero(*sig.interval(res["samples"][:, 0]))
    assert false_alarms <= 8  # ~5% expected


def test_point_estimates_are_the_observed_differences():
    rng = np.random.default_rng(2)
    comp, base, masks = simulate(rng)
    res = sig.paired_bootstrap(comp, base, masks, n_boot=100)
    acc = lambda c: min(c[masks[:, g]].mean() for g in range(masks.shape[1]))  # noqa: E731
    assert res["d_avg"] == pytest.approx(comp.mean() - base.mean())
    assert res["d_wg"] == pytest.approx(acc(comp) - acc(base))
    same = sig.paired_bootstrap(base, base, masks, n_boot=100)
    assert np.all(same["samples"] == 0)  # identical predictions: no uncertainty about a zero change


def test_overlapping_groups_keep_their_sizes():
    rng = np.random.default_rng(3)
    n = 600
    masks = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.3, rng.random(n) < 0.1], axis=1)  # overlapping
    comp, base = rng.random(n) < 0.7, rng.random(n) < 0.8
    res = sig.paired_bootstrap(comp, base, masks, n_boot=500)
    lo, hi = sig.interval(res["samples"][:, 0])
    assert lo < res["d_avg"] < hi and hi < 0.05


def test_across_seeds_combines_seed_and_example_variation():
    rng = np.random.default_rng(4)
    per_seed = []
    for s in range(5):
        comp, base, masks = simulate(rng)
        per_seed.append(sig.paired_bootstrap(comp, base, masks, n_boot=500, seed=s)["samples"])
    agg = sig.across_seeds(per_seed, n_boot=2000)
    lo, hi = sig.interval(agg[:, 1])
    t_avg, t_wg = truth()
    assert lo <= t_wg <= hi and hi < 0
    one_lo, one_hi = sig.interval(per_seed[0][:, 1])
    assert hi - lo < one_hi - one_lo  # five seeds pin the mean down better than one


def make_preds(index, correct, masks):
    return sig.Predictions(index=np.asarray(index), correct=np.asarray(correct, bool), masks=masks, group_names=[])


def test_compare_pairs_by_example_id_and_rejects_different_test_sets():
    rng = np.random.default_rng(5)
    comp, base, masks = simulate(rng, drop=np.array([0.0, 0.0, 0.0, 0.3]))
    ids = rng.permutation(len(comp)) + 1000
    perm = rng.permutation(len(comp))  # the compressed run lists the same examples in another order
    a = make_preds(ids[perm], comp[perm], masks[perm])
    b = make_preds(ids, base, masks)
    out = sig.compare([(1, a, b)], n_boot=500)
    row = out["per_seed"][0]
    assert row["d_wg"] == pytest.approx(sig.paired_bootstrap(comp, base, masks, n_boot=10)["d_wg"])
    assert row["d_wg_sig"] and out["across"]["seeds"] == 1
    other = make_preds(ids + 1, comp, masks)
    bad = sig.compare([(1, other, b)], n_boot=100)
    assert "different examples" in bad["per_seed"][0]["error"] and bad["across"] is None
    shuffled = make_preds(ids, comp, masks[rng.permutation(len(comp))])
    assert "disagree" in sig.compare([(1, shuffled, b)], n_boot=100)["per_seed"][0]["error"]


def test_prediction_metadata_follows_the_saved_prediction_order(tmp_path):
    """What the run stores next to the predictions (``results.example_metadata`` + ``write_predictions``), and
    how the report reads it back."""
    import pandas as pd

    from subgroup_robustness import results
    from subgroup_robustness.data.groups import build_groupings

    dataset = {"name": "toy", "label_names": ["no", "yes"], "attributes": {"a": ["x", "y", "z"]},
               "groupings": {"groups": {"by": ["label", "a"]}}}
    rng = np.random.default_rng(6)
    # the data module's table: every row's label and attribute; the test split is 50 of its 150 rows
    table = pd.DataFrame({"label": rng.integers(0, 2, 150), "a": rng.integers(0, 3, 150), "text": ["t"] * 150})
    ids = rng.permutation(50) * 3  # dataset row ids of the test split, in evaluation order (unsorted)
    label, pred = table["label"].to_numpy()[ids], 1 - table["label"].to_numpy()[ids]
    pred[: 25] = label[: 25]
    arrays = results.example_metadata(table, ["label", "a"], ids)
    expected = table[["label", "a"]].to_numpy()[ids]
    assert np.array_equal(arrays["metadata"], expected) and list(arrays["metadata_columns"]) == ["label", "a"]
    # ids that do not fit the table: nothing is invented
    assert results.example_metadata(table, ["label", "a"], ids + 150) == {}
    assert results.example_metadata(table, ["label", "a"], ids - 3) == {}
    assert results.example_metadata(None, ["label", "a"], ids) == {}

    path = results.write_predictions(tmp_path / results.PREDICTIONS_FILE, ids, label, pred, arrays)
    saved = results.read_predictions(path)
    order = np.argsort(ids)
    assert np.array_equal(saved["index"], np.sort(ids))  # saved sorted by id, every array in that order
    assert np.array_equal(saved["metadata"], expected[order]) and np.array_equal(saved["pred"], pred[order])
    p = sig.load_predictions(path, dataset)
    grouping = build_groupings(dataset)["groups"]
    assert p.group_names == grouping.group_names
    assert np.array_equal(p.correct, (pred == label)[order])
    assert np.array_equal(p.masks, grouping.masks(torch.as_tensor(expected[order])).numpy())


def test_unique_rows_matches_numpy_order_and_inverse():
    """The strata of the bootstrap come from integer codes (fast on 100,000s of examples) in np.unique's order,
    so a seeded interval does not depend on which path computed them."""
    rng = np.random.default_rng(7)
    for g in (1, 4, 16, 63, 70):  # 70 columns: the plain np.unique path
        masks = rng.random((3000, g)) < 0.3
        patterns, inverse = sig.unique_rows(masks)
        expected, exp_inverse = np.unique(masks, axis=0, return_inverse=True)
        assert np.array_equal(patterns, expected) and np.array_equal(inverse, exp_inverse.reshape(-1))
