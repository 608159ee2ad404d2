"""Group metrics against values computed by hand."""

import math

import pytest
import torch

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.metrics.group_metrics import GroupAccuracy, flatten_metrics

DS = {
    "name": "toy",
    "label_names": ["neg", "pos"],
    "attributes": {"identity": ["a", "b", "c"], "male": ["0", "1"], "female": ["0", "1"]},
    "groupings": {"groups": {"by": ["label", "identity"]}, "wilds": {"each": ["male", "female"], "by": ["label"]}},
}


def test_group_names_and_masks():
    g = build_groupings(DS)
    assert g["groups"].group_names == ["neg:a", "neg:b", "neg:c", "pos:a", "pos:b", "pos:c"]
    assert g["wilds"].group_names == ["male:neg", "male:pos", "female:neg", "female:pos"]
    assert g["groups"].disjoint and not g["wilds"].disjoint
    meta = torch.tensor([[1, 2, 1, 1], [0, 0, 0, 0]])  # label, identity, male, female
    m = g["wilds"].masks(meta)
    assert m.tolist() == [[False, True, False, True], [False, False, False, False]]
    assert g["groups"].group_ids(meta).tolist() == [5, 0]


def test_accuracy_by_hand_with_overlap_empty_and_singleton_groups():
    g = build_groupings(DS)["wilds"]
    # label, identity, male, female
    meta = torch.tensor([
        [1, 0, 1, 1],  # male & female, pos: correct
        [1, 0, 1, 0],  # male, pos: wrong
        [0, 0, 1, 0],  # male, neg: correct
        [0, 0, 0, 0],  # no identity: counts in the average only
        [1, 0, 0, 0],  # no identity: wrong
    ])
    target = meta[:, 0]
    preds = torch.tensor([1, 0, 0, 0, 0])
    metric = GroupAccuracy(g.group_names)
    metric.update(preds, target, g.masks(meta))
    res = metric.compute()
    assert res["acc_avg"] == pytest.approx(3 / 5)
    assert res["count"] == {"male:neg": 1, "male:pos": 2, "female:neg": 0, "female:pos": 1}
    assert res["acc"]["male:neg"] == 1.0          # single-example group
    assert res["acc"]["male:pos"] == 0.5          # overlapping with female:pos
    assert res["acc"]["female:pos"] == 1.0
    assert math.isnan(res["acc"]["female:neg"])   # absent, never 0 or 1
    assert res["acc_wg"] == 0.5 and res["worst_group"] == "male:pos"
    flat = flatten_metrics("test", "wilds16", res)
    assert "test/wilds16/acc/female:neg" not in flat
    assert flat["test/wilds16/count/female:neg"] == 0.0
    assert flat["test/wilds16/acc_wg"] == 0.5
    primary = flatten_metrics("val", None, res)
    assert primary["val/acc_avg"] == pytest.approx(0.6) and primary["val/acc/male:pos"] == 0.5


def test_states_sum_like_ddp():
    """Two processes' counts merge by summation (what dist_reduce_fx='sum' does under DDP)."""
    g = build_groupings(DS)["groups"]
    meta = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 2, 0, 0]])
    preds = torch.tensor([0, 1, 0, 1])
    whole = GroupAccuracy(g.group_names)
    whole.update(preds, meta[:, 0], g.masks(meta))
    a, b = GroupAccuracy(g.group_names), GroupAccuracy(g.group_names)
    a.update(preds[:2], meta[:2, 0], g.masks(meta[:2]))
    b.update(preds[2:], meta[2:, 0], g.masks(meta[2:]))
    a.merge_state(b)
    ra, rw = a.compute(), whole.compute()
    assert ra["count"] == rw["count"] and ra["acc_avg"] == rw["acc_avg"]
    assert ra["acc"]["pos:b"] == 0.5 and ra["acc"]["neg:c"] == 0.0


def test_bad_grouping_spec_is_named():
    from subgroup_robustness.utils.errors import ConfigError

    bad = dict(DS, groupings={"groups": {"by": ["label", "religion"]}})
    with pytest.raises(ConfigError, match="religion"):
        build_groupings(bad)
    with pytest.raises(ConfigError, match="primary"):
        build_groupings(dict(DS, groupings={"other": {"by": ["label"]}}))
