"""int8wo / int4wo / w8a8: the weights are stored in the dtype promised and the outputs stay close to fp32.

Tolerances (relative Frobenius error of each quantized Linear's output on random inputs, and of the final
hidden states): int8 symmetric per row rounds every weight by at most half a step of max|w_row|/127, about
0.3-1 % of the output; w8a8 adds the same-sized rounding of the per-token int8 activations; 4-bit with one
(scale, zero) per 32 inputs has 16 levels per group, a rounding noise of about range/15/sqrt(12), 5-8 % of
the output for Gaussian weights (its CPU kernel multiplies in bfloat16: +0.5 % at most). So: < 2 % (int8wo),
< 3 % (w8a8), < 12 % (int4wo) per Linear; the final hidden states, where the residual stream and LayerNorm
dilute it, < 1 % / 1 % / 5 %."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from subgroup_robustness.compression.context import SimpleContext
from subgroup_robustness.compression.weight_only import (Int4PackedLinear, Int4WeightOnly, Int8WeightOnly, W8A8,
                                                         int4_cpu_supported, storage_dtypes)
from subgroup_robustness.models.figures import model_figures, state_dict_bytes
from subgroup_robustness.utils.errors import ConfigError

HIDDEN = 64


def tiny(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * HIDDEN, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def inputs(n: int = 6, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, t // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def quantized(comp):
    fp = tiny()
    ctx = SimpleContext(copy.deepcopy(fp))
    ctx.update(comp.apply(ctx))
    return fp, ctx


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_errors(fp: nn.Module, q: nn.Module) -> dict[str, float]:
    """Per Linear of the fp32 model: relative output error of its quantized counterpart on random inputs."""
    x = torch.randn(24, 2 * HIDDEN, generator=torch.Generator().manual_seed(2))
    qmods = dict(q.named_modules())
    out = {}
    with torch.no_grad():
        for fqn, lin in fp.named_modules():
            if isinstance(lin, nn.Linear):
                xi = x[:, : lin.in_features]
                out[fqn] = rel(qmods[fqn](xi), lin(xi))
    return out


def hidden_error(fp, q) -> float:
    x = inputs()
    with torch.no_grad():
        a = q(**x, output_hidden_states=True).hidden_states[-1]
        b = fp(**x, output_hidden_states=True).hidden_states[-1]
    return rel(a, b)


def test_int8_weight_only_stores_int8_and_stays_close():
    comp = Int8WeightOnly()
    fp, ctx = quantized(comp)
    n_linear = sum(isinstance(m, nn.Linear) for m in fp.modules())
    for fqn, m in ctx.model.named_modules():
        if isinstance(m, nn.Linear):
            assert type(m.weight).__name__ == "Int8Tensor" and m.weight.qdata.dtype == torch.int8, fqn
            assert m.weight.act_quant_kwargs is None  # weight-only: activations stay fp32
    assert max(linear_errors(fp, ctx.model).values()) < 0.02
    assert hidden_error(fp, ctx.model) < 0.01
    assert model_figures(ctx.model)["weight_dtypes"]["torch.int8"] > 0
    rep = comp.report(ctx)
    assert rep["quantized_linear_layers"] == n_linear and rep["fp32_linear_layers"] == []
    flags = (comp.quantizes, comp.eval_on_cpu, comp.trains, comp.stage, comp.start_from)
    assert flags == (True, True, False, "after", "finetuned")


def test_w8a8_quantizes_weights_and_activations():
    fp, ctx = quantized(W8A8())
    for fqn, m in ctx.model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight.qdata.dtype == torch.int8 and m.weight.act_quant_kwargs is not None, fqn
    assert max(linear_errors(fp, ctx.model).values()) < 0.03
    assert hidden_error(fp, ctx.model) < 0.01


@pytest.mark.skipif(not int4_cpu_supported()[0], reason="ATen's CPU int4 kernel does not run here")
def test_int4_packed_two_per_byte_on_the_cpu_kernel():
    comp = Int4WeightOnly(group_size=32)
    fp, ctx = quantized(comp)
    fp_linears = {f: m for f, m in fp.named_modules() if isinstance(m, nn.Linear)}
    for fqn, lin in fp_linears.items():
        q = ctx.model.get_submodule(fqn)
        assert isinstance(q, Int4PackedLinear), fqn
        assert q.weight_int4pack.dtype == torch.uint8
        n_pad = -(-lin.out_features // 16) * 16
        assert q.weight_int4pack.numel() == n_pad * lin.in_features // 2  # two 4-bit values per byte
        assert q.scales_and_zeros.shape == (lin.in_features // 32, n_pad, 2)  # one (scale, zero) per 32 inputs
        # the kernel's weight is within half a step of the fp32 weight, group by group (0.51: the scale
        # and zero are stored in bfloat16, the dtype the kernel reads them in)
        w, deq = lin.weight.detach(), q.dequantized_weight()
        groups = w.reshape(w.shape[0], -1, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / 15
        assert ((deq - w).abs().reshape_as(groups) <= 0.51 * step.unsqueeze(-1)).all(), fqn
    errs = linear_errors(fp, ctx.model)
    assert max(errs.values()) < 0.12
    assert errs["classifier"] < 0.12  # 3 outputs: padded to 16 for the packer, sliced back
    assert hidden_error(fp, ctx.model) < 0.05
    int8 = quantized(Int8WeightOnly())[1].model
    assert state_dict_bytes(ctx.model) < state_dict_bytes(int8) < state_dict_bytes(fp)
    assert "torch.uint8" in model_figures(ctx.model)["weight_dtypes"]
    assert set(storage_dtypes(ctx.model).values()) == {"int4 (packed uint8)"}


def test_int4_group_size_and_compute_dtype_are_configurable():
    fp, ctx = quantized(Int4WeightOnly(group_size=64, compute_dtype="float32"))
    q = ctx.model.bert.encoder.layer[0].output.dense  # 128 inputs
    assert q.scales_and_zeros.shape[0] == 128 // 64 and q.scales_and_zeros.dtype == torch.float32
    x = torch.randn(5, 128)
    with torch.no_grad():  # float32 compute: exactly the dequantized weight's matmul
        assert torch.allclose(q(x), x @ q.dequantized_weight().t() + q.bias, atol=1e-5)


def test_int4_torchao_intx_layout_stores_int4_values_in_int8():
    comp = Int4WeightOnly(group_size=32, layout="intx_unpacked")
    fp, ctx = quantized(comp)
    for fqn, m in ctx.model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and w.qdata.dtype == torch.int8, fqn
            assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7  # 4-bit values
    assert max(linear_errors(fp, ctx.model).values()) < 0.12
    assert "torchao IntxWeightOnlyConfig" in comp.report(ctx)["method"]


def test_quantize_classifier_false_keeps_the_head_fp32():
    fp, ctx = quantized(Int4WeightOnly(quantize_classifier=False))
    assert isinstance(ctx.model.classifier, nn.Linear) and ctx.model.classifier.weight.dtype == torch.float32
    fp, ctx = quantized(Int8WeightOnly(quantize_classifier=False))
    assert type(ctx.model.classifier.weight).__name__ == "Parameter"


def test_arguments_are_checked_before_training():
    with pytest.raises(ConfigError, match="group_size"):
        Int4WeightOnly(group_size=48)
    with pytest.raises(ConfigError, match="layout"):
        Int4WeightOnly(layout="tinygemm")
    with pytest.raises(ConfigError, match="compute_dtype"):
        Int4WeightOnly(compute_dtype="float16")
    with pytest.raises(ConfigError, match="quantize_classifier"):
        W8A8(quantize_classifier="no")
