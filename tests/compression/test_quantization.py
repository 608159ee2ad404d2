"""dq / sq / qat leave int8 Linear weights, keep the logits of the fp32 model, shrink the saved file by
the expected amount, and QAT trains with fake quantization before converting."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from subgroup_robustness.compression.context import Compressed, SimpleContext
from subgroup_robustness.compression.quantization import (
    DynamicInt8,
    QuantizationAwareTraining,
    StaticInt8,
    calibrate,
    convert_qat,
    EXACT_K,
    _scaled_int8_mm,
    dynamic_int8,
    int8_matmul_kernel,
    int8_mm_via_fp32,
    prepare_qat,
    quantized_linears,
    static_int8,
)
from subgroup_robustness.models.figures import count_parameters, model_figures, state_dict_bytes
from subgroup_robustness.utils.errors import ConfigError

INT8 = ("torch.int8", "torch.qint8")


def tiny(seed: int = 0, hidden: int = 64, inter: int = 128, vocab: int = 200, labels: int = 3):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=inter, max_position_embeddings=64, num_labels=labels)
    return BertForSequenceClassification(cfg).eval()


def batch(n: int = 128, t: int = 12, seed: int = 0, vocab: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, t // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def linear_weight_count(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("backend", ["torchao", "torch.ao"])
def test_dq_linear_weights_are_int8_and_logits_match_fp32(backend):
    m = tiny()
    x = batch()
    ref = logits(m, x)
    q = dynamic_int8(copy.deepcopy(m), backend=backend)
    dtypes = quantized_linears(q)
    assert len(dtypes) == 2 * 6 + 2 and all(v in INT8 for v in dtypes.values()), dtypes
    out = logits(q, x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    assert count_parameters(q) < count_parameters(m)  # int8 weights are not counted as float parameters


@pytest.mark.parametrize("backend", ["torchao", "torch.ao"])
def test_int8_file_shrinks_by_three_bytes_per_linear_weight(backend):
    m = tiny(hidden=128, inter=512, vocab=100)
    n_linear = linear_weight_count(m)
    saved = state_dict_bytes(m) - state_dict_bytes(dynamic_int8(copy.deepcopy(m), backend=backend))
    # fp32 -> int8 saves 3 of 4 bytes per Linear weight, minus the per-row (or per-tensor) scales
    assert 0.9 * 3 * n_linear <= saved <= 3 * n_linear


def test_dq_can_keep_the_classifier_fp32():
    q = dynamic_int8(tiny(), quantize_classifier=False)
    dtypes = quantized_linears(q)
    assert dtypes.pop("classifier") == "torch.float32"
    assert all(v in INT8 for v in dtypes.values())


def test_torch_ao_backend_is_quiet():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = dynamic_int8(tiny(), backend="torch.ao")
    assert not [w for w in caught if "deprecated" in str(w.message).lower()]
    assert all(v == "torch.qint8" for v in quantized_linears(q).values())


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="backend"):
        DynamicInt8(backend="fbgemm")
    with pytest.raises(ConfigError, match="calibration_batches"):
        StaticInt8(calibration_batches=0)
    with pytest.raises(ConfigError, match="observer"):
        StaticInt8(observer="percentile")  # checked when the chain is built, before any calibration
    with pytest.raises(ConfigError, match="observer"):
        calibrate(tiny(), [batch(4)], observer="percentile")
    with pytest.raises(ConfigError, match="no calibration batches"):
        calibrate(tiny(), [])


def test_sq_calibrates_every_linear_and_stays_close():
    m = tiny()
    calib = [batch(16, seed=s) for s in range(3)]
    qparams, seen = calibrate(copy.deepcopy(m), calib)
    assert seen == 48 and len(qparams) == 2 * 6 + 2
    assert qparams["classifier"][0].shape == (1, 1)  # shaped like each Linear's input
    assert qparams["bert.encoder.layer.0.attention.self.query"][0].shape == (1, 1, 1)
    q = static_int8(copy.deepcopy(m), qparams)
    assert all(v == "torch.int8" for v in quantized_linears(q).values())
    w = q.classifier.weight
    assert torch.equal(w.act_quant_scale, qparams["classifier"][0])  # the input scale is fixed, not per batch
    x = batch(seed=9)
    ref, out = logits(m, x), logits(q, x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_int8_products_via_fp32_slices_equal_torch_int_mm_bit_for_bit_where_one_fp32_product_cannot():
    """127 x 127 = 16129 is odd: a sum of 2049 of them (33,048,321) lies above 2**25, where fp32 keeps only
    multiples of 4, so one fp32 matrix product cannot give the int32 result; slices of <= 1024 can."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((7, 384, 33), (64, 1536, 96), (5, 3 * EXACT_K + 1, 8)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
        a[0], b[:, 0] = -128, -128  # the largest product, in every position of one output
        assert torch.equal(int8_mm_via_fp32(a, b), torch._int_mm(a, b))
    a, b = torch.full((8, 2049), 127, dtype=torch.int8), torch.full((2049, 8), 127, dtype=torch.int8)
    exact = torch._int_mm(a, b)
    assert int(exact[0, 0]) == 2049 * 127 * 127
    assert not torch.equal((a.float() @ b.float()).to(torch.int32), exact)
    assert torch.equal(int8_mm_via_fp32(a, b), exact)


def test_torchao_int8_linears_give_identical_outputs_through_the_fp32_exact_products(monkeypatch):
    """The route taken on CPUs without VNNI/AMX, forced here on any CPU: static and dynamic int8 models give the
    same logits, bit for bit, as with torch._int_mm; the report says which kernel ran."""
    import importlib

    # (``import a.b as x`` would find torchao.quantization's function quantize_, not the package)
    int8_tensor = importlib.import_module("torchao.quantization.quantize_.workflows.int8.int8_tensor")

    m = tiny(hidden=64, inter=1536 * 2)  # the FFN's second Linear multiplies over K = 3072 > EXACT_K
    qparams, _ = calibrate(copy.deepcopy(m), [batch(16, seed=s) for s in range(2)])
    models = {"sq": static_int8(copy.deepcopy(m), qparams), "dq": dynamic_int8(copy.deepcopy(m), backend="torchao")}
    x = batch(seed=3)
    original = int8_tensor.int_scaled_matmul
    if getattr(original, "sr_exact_fp32", False):  # already routed (this CPU has no VNNI): compare with torchao's
        from torchao.kernel import int_scaled_matmul as original
    monkeypatch.setattr(int8_tensor, "int_scaled_matmul", original)
    ref = {k: logits(q, x) for k, q in models.items()}
    calls = []
    exact = _scaled_int8_mm(original)
    monkeypatch.setattr(int8_tensor, "int_scaled_matmul", lambda *a: calls.append(a[0].shape) or exact(*a))
    for k, q in models.items():
        assert torch.equal(logits(q, x), ref[k]), k
    assert len(calls) == 2 * (2 * 6 + 2)  # every int8 Linear of both models multiplied through it
    assert any(shape[-1] > EXACT_K for shape in calls)
    assert "fp32" in int8_matmul_kernel() or int8_matmul_kernel() == "torch._int_mm"


def test_minmax_observer_scale_is_the_observed_range():
    m = tiny()
    seen = {}
    m.classifier.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    qparams, _ = calibrate(m, [batch(32)], observer="minmax")
    x = seen["x"]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale, zp = qparams["classifier"]
    assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert int(zp) == pytest.approx(-128 - lo / float(scale), abs=1)


def test_qat_trains_with_fake_quantization_then_converts_to_int8():
    from torchao.quantization.qat import FakeQuantizedLinear

    m = tiny()
    prepare_qat(m)
    assert sum(isinstance(mod, FakeQuantizedLinear) for mod in m.modules()) == 2 * 6 + 2
    m.train()
    before = m.classifier.weight.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = batch(16)
    loss = m(**x, labels=torch.arange(16) % 3).loss
    loss.backward()
    assert m.bert.encoder.layer[0].attention.self.query.weight.grad is not None  # gradients pass the fake quant
    opt.step()
    assert not torch.equal(m.classifier.weight.detach(), before)
    m.eval()
    fake = logits(m, x)
    q = convert_qat(m)
    assert all(v == "torch.int8" for v in quantized_linears(q).values())
    assert not any(isinstance(mod, FakeQuantizedLinear) for mod in q.modules())
    real = logits(q, x)
    # what was trained is what runs: int8 kernels reproduce the fake-quantized forward
    assert (real - fake).abs().max() < 0.05 * fake.abs().max()


def test_compressors_declare_cpu_evaluation_and_report(tmp_path):
    m = tiny()
    ctx = SimpleContext(model=m)
    comp = DynamicInt8()
    result = comp.apply(ctx)
    assert isinstance(result, Compressed) and result.tokenizer is None and result.teacher is None
    ctx.update(result)
    rep = comp.report(ctx)
    assert rep["int8_linear_layers"] == 14 and rep["fp32_linear_layers"] == []
    assert comp.quantizes and comp.eval_on_cpu and not comp.trains and comp.start_from == "finetuned"
    qat = QuantizationAwareTraining()
    assert qat.stage == "during" and qat.start_from == "pretrained" and qat.trains and qat.eval_on_cpu
    figures = model_figures(ctx.model)
    assert figures["weight_dtypes"]["torch.int8"] == linear_weight_count(tiny())


def test_cpu_latency_is_measured_outside_the_compressor():
    """The latency a quantizer used to report itself is measured by the experiment before and after every
    stage with ``models.figures.cpu_latency_ms`` (see test_chain's real pr40+dq run): on CPU, in eval mode,
    leaving the model's mode as it was; a list of batches or a loader factory."""
    from subgroup_robustness.models.figures import cpu_latency_ms

    m = tiny().train()
    batches = [batch(8, seed=s) for s in range(3)]
    fp32 = cpu_latency_ms(m, batches, picks=2, repeats=1)
    assert fp32 is not None and fp32 > 0 and m.training
    q = dynamic_int8(copy.deepcopy(m))
    int8 = cpu_latency_ms(q, lambda: iter(batches), picks=5, repeats=1)
    assert int8 is not None and int8 > 0
    assert cpu_latency_ms(m, batches, picks=0) is None and cpu_latency_ms(m, [], picks=2) is None
    assert cpu_latency_ms(m, None, picks=2) is None
    with pytest.raises(TypeError):
        DynamicInt8(latency_batches=4)  # no compressor measures latency of its own any more
