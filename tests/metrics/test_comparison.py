"""Flips, KL, macro-F1, calibration and class-balanced accuracies against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.metrics.comparison import (PROB_FLOOR, align, expected_calibration_error, flip_metrics,
                                                     kl_divergence, macro_f1, prediction_metrics, quality_metrics)

DS = {
    "name": "toy",
    "label_names": ["neg", "pos"],
    "attributes": {"identity": ["a", "b", "c"], "male": ["0", "1"], "female": ["0", "1"]},
    "groupings": {"groups": {"by": ["label", "identity"]},
                  "wilds": {"each": ["male", "female"], "by": ["label"]},
                  "ident": {"by": ["identity"]}},
}
# label, identity, male, female        primary        wilds (overlapping)      ident
META = np.array([
    [0, 0, 1, 0],  # i0                neg:a          male:neg                 a
    [0, 0, 0, 1],  # i1                neg:a          female:neg               a
    [1, 0, 1, 1],  # i2                pos:a          male:pos + female:pos    a
    [1, 1, 0, 0],  # i3                pos:b          -                        b
    [0, 1, 1, 0],  # i4                neg:b          male:neg                 b
    [1, 2, 0, 1],  # i5                pos:c          female:pos               c
])                 # neg:c is empty
LABEL = META[:, 0]
BASE_PRED = np.array([0, 1, 1, 0, 0, 1])   # base correct: T F T F T T (4/6)
PRED = np.array([1, 1, 1, 1, 0, 0])        # run correct:  F F T T T F (3/6)
BASE_PROBS = np.array([[.75, .25], [.25, .75], [.25, .75], [.75, .25], [.875, .125], [.25, .75]], np.float16)
PROBS = np.array([[.25, .75], [.25, .75], [.25, .75], [.25, .75], [.875, .125], [1.0, 0.0]], np.float16)

LN3 = math.log(3)
# KL(base || run) per example: i0, i3: .75 ln 3 + .25 ln(1/3) = .5 ln 3; i5: run's 0 floored at 2^-24
K5 = 0.25 * math.log(0.25 / 1.0) + 0.75 * math.log(0.75 / PROB_FLOOR)


def masks(name):
    return build_groupings(DS)[name].masks(torch.as_tensor(META)).numpy()


def names(name):
    return build_groupings(DS)[name].group_names


def test_flips_and_kl_per_group_by_hand():
    out = flip_metrics("test", None, names("groups"), masks("groups"), LABEL, PRED, PROBS, BASE_PRED, BASE_PROBS)
    assert out["test/flip_rate"] == pytest.approx(3 / 6)
    assert out["test/flip_c2w"] == pytest.approx(2 / 6)     # i0, i5
    assert out["test/flip_w2c"] == pytest.approx(1 / 6)     # i3
    # accuracy change = w2c - c2w
    d_acc = (PRED == LABEL).mean() - (BASE_PRED == LABEL).mean()
    assert out["test/flip_w2c"] - out["test/flip_c2w"] == pytest.approx(d_acc)
    assert out["test/kl"] == pytest.approx((LN3 + K5) / 6)
    expected = {  # group: flip, c2w, w2c, kl
        "neg:a": (0.5, 0.5, 0.0, 0.25 * LN3),
        "neg:b": (0.0, 0.0, 0.0, 0.0),
        "pos:a": (0.0, 0.0, 0.0, 0.0),
        "pos:b": (1.0, 0.0, 1.0, 0.5 * LN3),
        "pos:c": (1.0, 1.0, 0.0, K5),
    }
    for g, (flip, c2w, w2c, kl) in expected.items():
        assert out[f"test/flip/{g}"] == pytest.approx(flip)
        assert out[f"test/flip_c2w/{g}"] == pytest.approx(c2w)
        assert out[f"test/flip_w2c/{g}"] == pytest.approx(w2c)
        assert out[f"test/kl/{g}"] == pytest.approx(kl, abs=1e-12)
    # the empty group gets no key at all, never 0
    assert not [k for k in out if k.endswith("/neg:c")]
    assert len(out) == 4 + 4 * 5


def test_overlapping_grouping_gets_its_prefix_and_no_overall_keys():
    out = flip_metrics("test", "wilds", names("wilds"), masks("wilds"), LABEL, PRED, None, BASE_PRED, None)
    assert out == pytest.approx({
        "test/wilds/flip/male:neg": 0.5, "test/wilds/flip_c2w/male:neg": 0.5, "test/wilds/flip_w2c/male:neg": 0.0,
        "test/wilds/flip/male:pos": 0.0, "test/wilds/flip_c2w/male:pos": 0.0, "test/wilds/flip_w2c/male:pos": 0.0,
        "test/wilds/flip/female:neg": 0.0, "test/wilds/flip_c2w/female:neg": 0.0,
        "test/wilds/flip_w2c/female:neg": 0.0,
        # i2 (also male:pos) and i5
        "test/wilds/flip/female:pos": 0.5, "test/wilds/flip_c2w/female:pos": 0.5,
        "test/wilds/flip_w2c/female:pos": 0.0,
    })  # no probabilities: no KL keys


def test_kl_is_zero_for_identical_and_finite_for_zeros():
    assert kl_divergence(BASE_PROBS, BASE_PROBS) == pytest.approx(np.zeros(6), abs=0)
    kl = kl_divergence(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))
    assert np.isfinite(kl).all() and kl[0] == pytest.approx(-math.log(PROB_FLOOR))


def test_quality_by_hand():
    out = quality_metrics("test", None, names("groups"), masks("groups"), LABEL, PRED, PROBS, 2)
    # groups' accuracies: neg:a 0, neg:b 1, pos:a 1, pos:b 1, pos:c 0; neg:c empty is not averaged in
    assert out["test/acc_mean_group"] == pytest.approx(3 / 5)
    # class 0 {i0, i1, i4}: 1/3 right; class 1 {i2, i3, i5}: 2/3
    assert out["test/acc_worst_class"] == pytest.approx(1 / 3)
    assert out["test/acc_balanced"] == pytest.approx(1 / 2)
    # confidences .75 x4 (2 right) -> bin 7, .875 (right) -> bin 8, 1.0 (wrong) -> bin 9
    assert out["test/ece"] == pytest.approx((abs(2 - 3.0) + abs(1 - 0.875) + abs(0 - 1.0)) / 6)
    f1 = {"neg:a": 0.0, "neg:b": 1.0, "pos:a": 1.0, "pos:b": 1.0, "pos:c": 0.0}
    ece = {"neg:a": 0.75, "neg:b": 0.125, "pos:a": 0.25, "pos:b": 0.25, "pos:c": 1.0}
    for g in f1:
        assert out[f"test/f1/{g}"] == pytest.approx(f1[g])
        assert out[f"test/ece/{g}"] == pytest.approx(ece[g])
    assert "test/f1/neg:c" not in out and "test/ece/neg:c" not in out


def test_quality_macro_f1_over_present_classes_and_secondary_groupings():
    out = quality_metrics("test", "ident", names("ident"), masks("ident"), LABEL, PRED, None, 2)
    # a: labels 0 0 1, preds 1 1 1 -> F1(0) = 0, F1(1) = 2/(2+2+0) = .5 -> .25
    # b: labels 1 0, preds 1 0 -> 1; c: label 1, pred 0 -> F1(1) = 0 (class 0 absent from the labels: not averaged)
    assert out == pytest.approx({"test/ident/acc_mean_group": (1 / 3 + 1 + 0) / 3,
                                 "test/ident/f1/a": 0.25, "test/ident/f1/b": 1.0, "test/ident/f1/c": 0.0})
    wl = quality_metrics("test", "wilds", names("wilds"), masks("wilds"), LABEL, PRED, PROBS, 2)
    assert wl["test/wilds/acc_mean_group"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert wl["test/wilds/ece/female:pos"] == pytest.approx((abs(1 - 0.75) + abs(0 - 1.0)) / 2)
    assert "test/wilds/ece" not in wl and "test/wilds/acc_worst_class" not in wl
    assert macro_f1([], [], 2) != macro_f1([], [], 2)  # NaN for no examples
    assert math.isnan(expected_calibration_error([], []))


def test_align_by_id_and_refuse_other_test_sets():
    a = np.array([7, 3, 9, 1])
    b = np.array([1, 9, 3, 7])
    pa, pb = align(a, b)
    assert a[pa].tolist() == b[pb].tolist() == [1, 3, 7, 9]
    with pytest.raises(ValueError, match="different test sets.*1 only in the run.*ids \\[9\\]"):
        align(a, np.array([1, 3, 7, 8]))
    with pytest.raises(ValueError, match="different test sets: 4 vs 3"):
        align(a, np.array([1, 3, 7]))
    with pytest.raises(ValueError, match="more than once"):
        align(np.array([1, 1, 2]), np.array([1, 2, 3]))


def test_from_saved_predictions_aligns_the_base_by_id():
    index = np.array([10, 11, 12, 13, 14, 15])
    run = {"index": index, "label": LABEL, "pred": PRED, "probs": PROBS, "metadata": META.astype(np.int16),
           "metadata_columns": np.array(["label", "identity", "male", "female"])}
    order = np.array([3, 5, 0, 2, 4, 1])  # the base saved in another order
    base = {"index": index[order], "label": LABEL[order], "pred": BASE_PRED[order], "probs": BASE_PROBS[order],
            "metadata": META[order], "metadata_columns": run["metadata_columns"]}
    out = prediction_metrics(run, build_groupings(DS), 2, base=base)
    direct = flip_metrics("test", None, names("groups"), masks("groups"), LABEL, PRED, PROBS, BASE_PRED, BASE_PROBS)
    direct.update(quality_metrics("test", None, names("groups"), masks("groups"), LABEL, PRED, PROBS, 2))
    for k, v in direct.items():
        assert out[k] == pytest.approx(v)
    assert out["test/wilds/flip/female:pos"] == pytest.approx(0.5) and "test/ident/f1/a" in out
    bad = dict(base, label=1 - base["label"])
    with pytest.raises(ValueError, match="different labels"):
        prediction_metrics(run, build_groupings(DS), 2, base=bad)
    with pytest.raises(ValueError, match="different test sets"):
        prediction_metrics(run, build_groupings(DS), 2, base=dict(base, index=base["index"] + 1))
