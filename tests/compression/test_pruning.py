"""Head pruning removes exactly the globally lowest-L1 heads and survives save/load; magnitude pruning
hits its sparsity and keeps the zeros through training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from subgroup_robustness.compression.context import Compressed, SimpleContext
from subgroup_robustness.compression.pruning import (
    HeadPruning,
    MagnitudePruning,
    head_scores,
    linear_targets,
    select_heads,
    weight_sparsity,
)
from subgroup_robustness.models.base_cache import BaseCache
from subgroup_robustness.models.figures import count_parameters
from subgroup_robustness.models.structure import heads_per_layer
from subgroup_robustness.models.surgery import KEPT_HEADS_KEY, load_pruned, prune_heads
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError

LAYERS, HEADS, HIDDEN = 3, 4, 32
D = HIDDEN // HEADS


def tiny(seed: int = 0, attn: str = "sdpa") -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3, attn_implementation=attn)
    return BertForSequenceClassification(cfg).eval()


def inputs(seed: int = 1, n: int = 6, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, t // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def manual_scores(model) -> list[list[float]]:
    """NNI's l1_weight, written out: mean over q/k/v of sum |W| of the head's rows."""
    out = []
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        out.append([sum(float(getattr(sa, p).weight.detach()[h * D:(h + 1) * D].abs().sum())
                        for p in ("query", "key", "value")) / 3 for h in range(HEADS)])
    return out


def test_scores_are_nni_l1_weight():
    m = tiny()
    got = [v for s in head_scores(m) for v in s.tolist()]
    assert got == pytest.approx([v for row in manual_scores(m) for v in row], rel=1e-5)


def test_lowest_l1_heads_are_removed_and_kept_weights_untouched():
    m = tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ranking = sorted((s, layer, h) for layer, row in enumerate(manual_scores(m)) for h, s in enumerate(row))
    n_prune = int(0.25 * LAYERS * HEADS)  # 3 of 12: no layer can run out of heads
    removed = {(layer, h) for _, layer, h in ranking[:n_prune]}
    expected = [[h for h in range(HEADS) if (layer, h) not in removed] for layer in range(LAYERS)]

    keep = select_heads(head_scores(m), 0.25)
    assert keep == expected
    prune_heads(m, keep)
    assert heads_per_layer(m) == [len(k) for k in expected]
    assert getattr(m.config, KEPT_HEADS_KEY) == expected
    for layer, kept in enumerate(expected):
        blk = m.bert.encoder.layer[layer].attention
        rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in kept])
        for p in ("query", "key", "value"):
            name = f"bert.encoder.layer.{layer}.attention.self.{p}"
            assert torch.equal(getattr(blk.self, p).weight, before[f"{name}.weight"][rows])
            assert torch.equal(getattr(blk.self, p).bias, before[f"{name}.bias"][rows])
        out = f"bert.encoder.layer.{layer}.attention.output.dense"
        assert torch.equal(blk.output.dense.weight, before[f"{out}.weight"][:, rows])
        assert torch.equal(blk.output.dense.bias, before[f"{out}.bias"])


def test_every_layer_keeps_one_head_and_the_total_is_still_met():
    m = tiny()
    with torch.no_grad():  # layer 0's heads are the weakest of all: NNI keeps its strongest one
        for p in ("query", "key", "value"):
            getattr(m.bert.encoder.layer[0].attention.self, p).weight.mul_(0.01)
    scores = manual_scores(m)
    keep = select_heads(head_scores(m), 0.5)  # 6 of 12
    assert keep[0] == [max(range(HEADS), key=lambda h: scores[0][h])]
    rest = sorted((s, layer, h) for layer in (1, 2) for h, s in enumerate(scores[layer]))[:3]
    for layer in (1, 2):
        assert keep[layer] == [h for h in range(HEADS) if (layer, h) not in {(lay, h2) for _, lay, h2 in rest}]
    assert sum(HEADS - len(k) for k in keep) == 6


def test_impossible_or_invalid_sparsity_is_a_clear_error():
    m = tiny()
    with pytest.raises(ConfigError, match="at most 9"):
        select_heads(head_scores(m), 0.9)  # 10 of 12 heads, but 3 layers keep one each
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        select_heads(head_scores(m), 1.0)
    with pytest.raises(ConfigError, match="keep 1..4"):
        prune_heads(m, [[], [0], [0]])
    # the compressors check their sparsity when the chain is built, before any model is loaded
    for bad in (1.0, -0.1, "lots"):
        with pytest.raises(ConfigError, match="sparsity"):
            HeadPruning(sparsity=bad)
        with pytest.raises(ConfigError, match="sparsity"):
            MagnitudePruning(sparsity=bad)


def test_pruned_model_is_smaller_and_trains():
    m = tiny(attn="eager")
    n0 = count_parameters(m)
    keep = [[0, 2], [1], [0, 1, 2, 3]]
    prune_heads(m, keep)
    removed = sum(HEADS - len(k) for k in keep)
    per_head = 3 * (D * HIDDEN + D) + D * HIDDEN  # q/k/v rows + biases, output-dense columns
    assert n0 - count_parameters(m) == removed * per_head
    m.train()
    x = inputs()
    out = m(**x, output_attentions=True, labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert [a.shape[1] for a in out.attentions] == [2, 1, 4]
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.bert.encoder.layer[1].attention.self.query.weight.grad.shape == (D, HIDDEN)


def test_save_and_reload_give_identical_logits(tmp_path):
    m = tiny()
    prune_heads(m, select_heads(head_scores(m), 0.5))
    x = inputs()
    with torch.no_grad():
        ref = m(**x).logits
    m.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved[KEPT_HEADS_KEY] == getattr(m.config, KEPT_HEADS_KEY)
    back = load_pruned(tmp_path / "pruned")
    assert heads_per_layer(back) == heads_per_layer(m)
    assert getattr(back.config, KEPT_HEADS_KEY) == getattr(m.config, KEPT_HEADS_KEY)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, ref)


def test_base_cache_reloads_a_pruned_model(tmp_path):
    from tests.helpers import make_tiny_bert
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "tok"))
    m = tiny()
    prune_heads(m, [[1], [0, 3], [2]])
    cache = BaseCache(tmp_path / "bases")
    cache.save("k", m, tok, {"note": "pruned"})
    back, _, info = cache.load("k")
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back(**x).logits, m(**x).logits)
    assert info == {"note": "pruned"}


def test_reload_with_a_wrong_recorded_shape_is_a_clear_error(tmp_path):
    m = tiny()
    prune_heads(m, [[1], [0, 3], [2]])
    m.save_pretrained(tmp_path / "p", safe_serialization=True)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg[KEPT_HEADS_KEY] = [[1, 2], [0, 3], [2]]
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptDataError, match=KEPT_HEADS_KEY):
        load_pruned(tmp_path / "p")


def test_pruning_twice_records_original_head_indices():
    m = tiny()
    prune_heads(m, [[0, 2, 3], [1, 2], [0, 1, 2, 3]])
    prune_heads(m, [[1, 2], [0], [3]])  # positions among the current heads
    assert getattr(m.config, KEPT_HEADS_KEY) == [[2, 3], [1], [3]]


def test_sparsity_zero_is_a_no_op():
    m = tiny()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        ref = m(**x).logits
    comp = HeadPruning(sparsity=0.0)
    ctx = SimpleContext(model=m)
    result = comp.apply(ctx)
    assert isinstance(result, Compressed) and result.model is m and result.tokenizer is None
    ctx.update(result)
    assert heads_per_layer(m) == [HEADS] * LAYERS
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(**x).logits, ref)
    rep = comp.report(ctx)
    assert rep["heads_removed"] == 0 and rep["params_removed"] == 0


def test_head_pruning_compressor_reports_heads():
    m = tiny()
    comp = HeadPruning(sparsity=0.5)
    ctx = SimpleContext(model=m)
    ctx.update(comp.apply(ctx))
    rep = comp.report(ctx)
    assert rep["heads_before"] == [4, 4, 4] and sum(rep["heads_kept"]) == 6
    assert rep["head_sparsity"] == 0.5 and rep["params_removed"] > 0
    assert rep["kept_head_indices"] == getattr(m.config, KEPT_HEADS_KEY)


def test_non_bert_attention_is_rejected():
    with pytest.raises(ConfigError, match="BERT-style"):
        head_scores(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ---- unstructured magnitude pruning --------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_magnitude_pruning_hits_target_and_removes_the_smallest(sparsity):
    m = tiny()
    targets = linear_targets(m)
    flat = torch.cat([mod.weight.detach().abs().flatten() for mod, _ in targets])
    comp = MagnitudePruning(sparsity=sparsity)
    ctx = SimpleContext(model=m)
    ctx.update(comp.apply(ctx))
    assert abs(weight_sparsity(targets) - sparsity) <= 0.01
    masks = torch.cat([mod.weight_mask.flatten() for mod, _ in targets])
    assert flat[masks == 0].max() <= flat[masks == 1].min()  # global: the smallest weights went, wherever they were
    assert len(targets) == 3 * 6 + 2  # every Linear: 6 per layer, pooler, classifier


def test_magnitude_pruning_keeps_zeros_through_training_then_bakes_them_in():
    m = tiny()
    comp = MagnitudePruning(sparsity=0.5)
    ctx = SimpleContext(model=m)
    ctx.update(comp.apply(ctx))
    assert ctx.model is m
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = m(**inputs(), labels=torch.tensor([0, 1, 2, 0, 1, 2])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    targets = linear_targets(m)
    assert abs(weight_sparsity(targets) - 0.5) <= 0.01
    ctx.update(comp.finalize(ctx))  # the masks are baked in place: no new model to take
    assert ctx.model is m
    assert not any(hasattr(mod, "weight_orig") for mod in m.modules())
    assert set(m.state_dict()) == set(tiny().state_dict())  # a plain model again: saves and loads as usual
    rep = comp.report(ctx)
    assert abs(rep["sparsity"] - 0.5) <= 0.01 and rep["nonzero_params"] < count_parameters(m)


def test_magnitude_pruning_encoder_scope_leaves_the_head_dense():
    m = tiny()
    MagnitudePruning(sparsity=0.5, scope="encoder").apply(SimpleContext(model=m))
    assert not hasattr(m.classifier, "weight_mask") and not hasattr(m.bert.pooler.dense, "weight_mask")
    assert abs(weight_sparsity(linear_targets(m, "encoder")) - 0.5) <= 0.01
    with pytest.raises(ConfigError, match="scope"):
        linear_targets(m, "everything")
    with pytest.raises(ConfigError, match="scope"):
        MagnitudePruning(sparsity=0.5, scope="everything")
