"""The DFR probe: a balanced last-layer refit recovers a minority group a spurious feature made the head fail."""

import numpy as np
import pytest
import torch

from subgroup_robustness.metrics.probe import dfr_probe, encoder_features, fit_logistic


def synthetic(n, minority, rng, dims=6):
    """Label y, spurious attribute a (a == y except for a ``minority`` fraction); a noisy core feature carries
    y, a clean spurious feature carries a, the rest is noise. Groups (y, a): 4 disjoint masks."""
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < minority, 1 - y, y)
    core = (2 * y - 1) + rng.normal(0, 1.0, n)
    spur = (2 * a - 1) * 2.0 + rng.normal(0, 0.1, n)
    x = np.column_stack([core, spur, rng.normal(0, 1, (n, dims - 2))])
    masks = np.stack([(y == yy) & (a == aa) for yy in (0, 1) for aa in (0, 1)], axis=1)
    return x, y, masks


NAMES = ["y0:a0", "y0:a1", "y1:a0", "y1:a1"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = synthetic(3000, 0.03, rng)     # what the head was fitted on: 97% spurious agreement
    held = synthetic(2000, 0.05, rng)      # held-out data, as skewed
    test = synthetic(2000, 0.5, rng)       # every group well represented
    return train, held, test


def worst_group(pred, y, masks):
    return min((pred == y)[masks[:, g]].mean() for g in range(masks.shape[1]))


def test_balanced_refit_beats_the_biased_head(data, one_thread):
    (xtr, ytr, _), (xh, yh, mh), (xte, yte, mte) = data
    w, b = fit_logistic(torch.as_tensor(xtr), torch.as_tensor(ytr), 2, c=1.0)
    head_pred = (torch.as_tensor(xte) @ w.T + b).argmax(1).numpy()
    head_wg = worst_group(head_pred, yte, mte)
    res = dfr_probe(xh, yh, mh, xte, yte, mte, seed=0, group_names=NAMES)
    assert head_wg < 0.5                        # the head follows the spurious feature
    assert res["acc_wg"] > 0.75                 # the noisy core feature alone gives ~0.84 per group
    assert res["acc_wg"] > head_wg + 0.3
    assert res["worst_group"] in NAMES and set(res["acc"]) == set(NAMES)
    assert res["count"] == {n: int(c) for n, c in zip(NAMES, mte.sum(0))}
    s = res["settings"]
    assert s["C"] in s["c_options"] and s["n_retrains"] == 20 and s["n_tune_splits"] == 5
    assert s["n_balanced"] == 4 * s["per_group_balanced"] == 4 * min(mh.sum(0))


def test_deterministic_under_a_seed(data, one_thread):
    _, (xh, yh, mh), (xte, yte, mte) = data
    kw = dict(n_retrains=4, n_tune_splits=2, c_options=(1.0, 0.1))
    a = dfr_probe(xh, yh, mh, xte, yte, mte, seed=3, **kw)
    b = dfr_probe(xh, yh, mh, xte, yte, mte, seed=3, **kw)
    a["settings"].pop("seconds"), b["settings"].pop("seconds")
    assert a == b


def test_empty_groups_and_overlapping_held_out_masks(data, one_thread):
    _, (xh, yh, mh), (xte, yte, mte) = data
    kw = dict(n_retrains=2, n_tune_splits=1, c_options=(1.0,))
    mte_empty = np.column_stack([mte, np.zeros(len(mte), bool)])
    res = dfr_probe(xh, yh, mh, xte, yte, mte_empty, seed=0, **kw)
    assert np.isnan(res["acc"]["g4"]) and res["count"]["g4"] == 0 and not np.isnan(res["acc_wg"])
    with pytest.raises(ValueError, match="disjoint groups"):
        dfr_probe(xh, yh, np.column_stack([mh, np.ones(len(mh), bool)]), xte, yte, mte, seed=0, **kw)


def test_encoder_features_are_what_the_head_sees(tiny_model_dir, one_thread):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from subgroup_robustness.models.classifier import SequenceClassifier

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["the women are good", "they hate those people", "some guys are kind", "never bad", "all smart"]
    batches = []
    for start, ids in ((0, [4, 8, 15]), (3, [16, 23])):
        enc = tok(texts[start:start + len(ids)], padding=True, return_tensors="pt")
        batches.append({**enc, "labels": torch.zeros(len(ids), dtype=torch.long), "index": torch.tensor(ids)})
    model.train()
    feats, index = encoder_features(model, batches)
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    assert index.tolist() == [4, 8, 15, 16, 23]
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model.bert(**inputs)
    np.testing.assert_allclose(feats[:3], out.pooler_output.numpy(), rtol=1e-5, atol=1e-6)
    cls, _ = encoder_features(SequenceClassifier(model), batches, at="cls")
    np.testing.assert_allclose(cls[:3], out.last_hidden_state[:, 0].numpy(), rtol=1e-5, atol=1e-6)
