"""Degenerate runs: one-class predictions, a zeroed classifier or pooler."""

import numpy as np
import pytest
import torch
from torch.nn.utils import prune


@pytest.fixture()
def tiny(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)


def balanced_preds(n=100):
    return np.arange(n) % 2


def test_healthy_tiny_model_with_balanced_predictions_is_not_flagged(tiny):
    from subgroup_robustness.metrics.degenerate import degeneracy

    res = degeneracy(balanced_preds(), 2, model=tiny)
    assert res["degenerate"] is False and res["reasons"] == []
    assert res["majority_fraction"] == 0.5
    assert set(res["zero_fraction"]) == {"classifier.weight", "bert.pooler.dense.weight"}
    assert max(res["zero_fraction"].values()) < 0.01


def test_zeroed_classifier_is_flagged_by_name(tiny):
    from subgroup_robustness.metrics.degenerate import degeneracy

    with torch.no_grad():
        tiny.classifier.weight.zero_()
    res = degeneracy(balanced_preds(), 2, model=tiny)
    assert res["degenerate"] is True
    assert res["reasons"] == ["classifier.weight is 100.0% zeros"]


def test_nearly_zero_pooler_through_pruning_masks_and_lightning_wrapper(tiny):
    from subgroup_robustness.metrics.degenerate import degeneracy
    from subgroup_robustness.models.classifier import SequenceClassifier

    # the masks still on (weight = weight_orig * weight_mask), as during the re-fine-tune; 32x32 = 1024 entries
    prune.l1_unstructured(tiny.bert.pooler.dense, "weight", amount=1020)
    res = degeneracy(balanced_preds(), 2, model=SequenceClassifier(tiny))
    assert res["degenerate"] is True
    assert res["reasons"] == ["bert.pooler.dense.weight is 99.6% zeros"]
    # below the threshold: not flagged
    assert not degeneracy(balanced_preds(), 2, model=tiny, zero_threshold=0.999)["degenerate"]


def test_one_class_predictions_are_flagged():
    from subgroup_robustness.metrics.degenerate import degeneracy

    res = degeneracy(np.ones(1719, int), 2, label_names=["not_biased", "biased"])
    assert res == {"degenerate": True, "reasons": ["predicts 'biased' for 100.0% of 1719 test examples"],
                   "majority_fraction": 1.0, "zero_fraction": {}}
    nearly = np.ones(1000, int)
    nearly[:5] = 0  # 99.5% >= 99%
    assert degeneracy(nearly, 2)["reasons"] == ["predicts '1' for 99.5% of 1000 test examples"]
    nearly[:20] = 0  # 98%
    assert not degeneracy(nearly, 2)["degenerate"]
    assert not degeneracy(np.zeros(0, int), 2)["degenerate"]


def test_dynamically_quantized_head_is_read(tiny):
    from subgroup_robustness.metrics.degenerate import degeneracy

    with torch.no_grad():
        tiny.classifier.weight.zero_()
    try:
        q = torch.ao.quantization.quantize_dynamic(tiny, {torch.nn.Linear}, dtype=torch.qint8)
    except (RuntimeError, AttributeError) as exc:  # no quantized engine on this build
        pytest.skip(f"quantize_dynamic unavailable: {exc}")
    res = degeneracy(balanced_preds(), 2, model=q)
    assert "classifier.weight is 100.0% zeros" in res["reasons"]
    assert res["zero_fraction"]["bert.pooler.dense.weight"] < 0.5
