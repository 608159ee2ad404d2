"""FFN-neuron pruning and layer dropping: fewer parameters, the documented ranking, and a saved model that
reloads in its smaller shape (models.surgery.load_pruned after save_pretrained) with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from subgroup_robustness.compression.context import SimpleContext
from subgroup_robustness.compression.structured import (FFN_KEPT_KEY, KEPT_LAYERS_KEY, FFNPruning, LayerDropping,
                                                        drop_layers, ffn_activation_importance, ffn_sizes,
                                                        ffn_weight_importance, layers_to_drop, prune_ffn,
                                                        select_neurons)
from subgroup_robustness.models.figures import count_parameters
from subgroup_robustness.models.surgery import KEPT_HEADS_KEY, is_reshaped, load_pruned, prune_heads
from subgroup_robustness.utils.errors import ConfigError
from tests.data.test_calibration import fake_datamodule

LAYERS, HIDDEN, INTER = 4, 32, 64


def tiny(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=INTER, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[:3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(**inputs()).logits


def reload(m, folder):
    m.save_pretrained(folder, safe_serialization=True)
    return load_pruned(folder)


# ---- FFN neurons ------------------------------------------------------------------------------------
def test_weight_importance_removes_the_lowest_norm_products_per_layer():
    m = tiny()
    layer = m.bert.encoder.layer[1]
    manual = layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(dim=0)
    scores = ffn_weight_importance(m)
    assert torch.allclose(scores[1], manual.detach())
    keep = select_neurons(scores, 0.25)
    assert all(len(k) == INTER - 16 for k in keep)
    lowest = set(torch.argsort(manual.detach())[:16].tolist())
    assert not lowest & set(keep[1])


def test_activation_importance_is_the_norm_of_each_neurons_contribution():
    m = tiny()
    batches = [inputs()]
    scores = ffn_activation_importance(m, batches)
    acts = []
    h = m.bert.encoder.layer[2].output.dense.register_forward_pre_hook(lambda mod, a: acts.append(a[0]))
    with torch.no_grad():
        m(**batches[0])
    h.remove()
    a = acts[0][batches[0]["attention_mask"].bool()]  # (real tokens, neurons)
    w_out = m.bert.encoder.layer[2].output.dense.weight
    contribution = torch.stack([torch.outer(a[:, j], w_out[:, j]).norm() for j in range(INTER)])
    assert torch.allclose(scores[2], contribution.detach(), rtol=1e-4)


def test_ffn_pruning_shrinks_the_matrices_and_reloads_in_its_shape(tmp_path):
    m = tiny()
    n0 = count_parameters(m)
    comp = FFNPruning(0.25)
    ctx = SimpleContext(m)
    ctx.update(comp.apply(ctx))
    removed = 16
    assert ffn_sizes(m) == [INTER - removed] * LAYERS
    assert n0 - count_parameters(m) == LAYERS * removed * (HIDDEN + 1 + HIDDEN)  # W_in row + bias, W_out column
    assert m.bert.encoder.layer[0].intermediate.dense.weight.shape == (INTER - removed, HIDDEN)
    assert m.bert.encoder.layer[0].output.dense.weight.shape == (HIDDEN, INTER - removed)
    rep = comp.report(ctx)
    assert rep["ffn_sparsity"] == pytest.approx(0.25) and rep["params_removed"] == n0 - count_parameters(m)
    ref = logits(m)
    back = reload(m, tmp_path / "ffn")
    assert is_reshaped(tmp_path / "ffn")
    assert json.loads((tmp_path / "ffn" / "config.json").read_text())[FFN_KEPT_KEY] == getattr(m.config, FFN_KEPT_KEY)
    assert ffn_sizes(back) == ffn_sizes(m) and count_parameters(back) == count_parameters(m)
    assert torch.equal(logits(back), ref)
    assert (comp.trains, comp.stage, comp.start_from, comp.quantizes) == (True, "after", "finetuned", False)


def test_ffn_pruning_with_calibrated_importance_records_the_draw():
    comp = FFNPruning(0.5, importance="activation", calibration={"source": "group_balanced", "examples": 30, "seed": 0})
    ctx = SimpleContext(tiny(), data=fake_datamodule())
    ctx.update(comp.apply(ctx))
    rep = comp.report(ctx)
    assert ffn_sizes(ctx.model) == [INTER // 2] * LAYERS
    assert rep["calibration"]["source"] == "group_balanced" and set(rep["calibration"]["group_counts"].values()) == {5}


def test_pruning_twice_records_original_neuron_indices():
    m = tiny()
    prune_ffn(m, [list(range(0, INTER, 2))] * LAYERS)   # keep the even neurons
    prune_ffn(m, [[0, 1, 2]] + [[5]] * (LAYERS - 1))  # positions among those
    assert getattr(m.config, FFN_KEPT_KEY) == [[0, 2, 4]] + [[10]] * (LAYERS - 1)


def test_invalid_ffn_arguments():
    with pytest.raises(ConfigError, match="sparsity"):
        FFNPruning(1.0)
    with pytest.raises(ConfigError, match="importance"):
        FFNPruning(0.25, importance="gradient")
    with pytest.raises(ConfigError, match="calibration.source"):
        FFNPruning(0.25, importance="activation", calibration={"source": "val"})


# ---- layers -------------------------------------------------------------------------------------------
def test_which_layers_are_dropped():
    assert layers_to_drop(6, 2) == [4, 5]
    assert layers_to_drop(6, 3, "bottom") == [0, 1, 2]
    assert layers_to_drop(12, 4, "alternate") == [5, 7, 9, 11]
    with pytest.raises(ConfigError, match="at most 3"):
        layers_to_drop(6, 4, "alternate")
    with pytest.raises(ConfigError, match="at least one"):
        layers_to_drop(4, 4)
    with pytest.raises(ConfigError, match="which"):
        LayerDropping(2, which="middle")


def test_layer_dropping_removes_the_top_layers_and_reloads(tmp_path):
    m = tiny()
    n0 = count_parameters(m)
    per_layer = sum(p.numel() for p in m.bert.encoder.layer[0].parameters())
    kept_weights = m.bert.encoder.layer[1].output.dense.weight.detach().clone()
    comp = LayerDropping(2)
    ctx = SimpleContext(m)
    ctx.update(comp.apply(ctx))
    assert len(m.bert.encoder.layer) == m.config.num_hidden_layers == LAYERS - 2
    assert n0 - count_parameters(m) == 2 * per_layer
    assert torch.equal(m.bert.encoder.layer[1].output.dense.weight, kept_weights)
    rep = comp.report(ctx)
    assert rep["kept_layer_indices"] == [0, 1] and rep["dropped_layer_indices"] == [2, 3]
    ref = logits(m)
    back = reload(m, tmp_path / "drop")
    assert not is_reshaped(tmp_path / "drop")  # num_hidden_layers alone: from_pretrained rebuilds it
    assert back.config.num_hidden_layers == 2 and getattr(back.config, KEPT_LAYERS_KEY) == [0, 1]
    assert count_parameters(back) == count_parameters(m)
    assert torch.equal(logits(back), ref)


def test_dropping_layers_after_head_and_ffn_pruning_keeps_their_records_in_step(tmp_path):
    m = tiny()
    prune_heads(m, [[0, 1], [2], [0, 1, 2, 3], [3]])
    prune_ffn(m, select_neurons(ffn_weight_importance(m), 0.5))
    ffn_before = getattr(m.config, FFN_KEPT_KEY)
    drop_layers(m, layers_to_drop(LAYERS, 2, "alternate"))  # drops layers 1 and 3
    assert getattr(m.config, KEPT_HEADS_KEY) == [[0, 1], [0, 1, 2, 3]]
    assert getattr(m.config, FFN_KEPT_KEY) == [ffn_before[0], ffn_before[2]]
    assert getattr(m.config, KEPT_LAYERS_KEY) == [0, 2]
    ref = logits(m)
    back = reload(m, tmp_path / "all")
    assert torch.equal(logits(back), ref) and count_parameters(back) == count_parameters(m)


# ---- chains ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain,ok", [(["ffn25", "dq"], True), (["drop2", "int8wo"], True),
                                      (["ffn50", "wanda24"], True), (["int4wo", "ffn25"], False)])
def test_chain_flags(chain, ok):
    from subgroup_robustness.compression.chain import expand_chain
    from subgroup_robustness.experiment import build_stages
    from tests.helpers import compose

    cfg = compose(["compressor=chain", f"compressor.chain=[{','.join(chain)}]"])
    expand_chain(cfg)
    if ok:
        build_stages(cfg.compressor)
    else:
        with pytest.raises(ConfigError, match="Put the quantizer last"):
            build_stages(cfg.compressor)
