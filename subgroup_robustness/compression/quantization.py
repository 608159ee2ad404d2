"""Int8 quantization (the paper's DQ, SQ and QAT), evaluated on CPU as the paper did.

- ``DynamicInt8`` (dq, alias quant8): the fine-tuned model's Linear weights become int8 (per row);
  activations are quantized per token at run time. Default backend: torchao's maintained
  ``Int8DynamicActivationInt8WeightConfig``. ``backend=torch.ao`` is the paper's exact
  ``quantize_dynamic({nn.Linear}, qint8)`` (fbgemm kernels, faster in eager mode on CPU, but deprecated).
- ``StaticInt8`` (sq): activation ranges are fixed beforehand from a number of training batches, observed
  with a histogram observer like torch.ao's x86 default qconfig the authors used; each Linear then gets
  torchao's ``Int8StaticActivationInt8WeightConfig`` with its own per-tensor asymmetric input scale.
  (torchao's PT2E route would turn the model into an exported graph with fixed shapes and no HF config;
  this keeps an ordinary Hugging Face model that takes any batch shape.)
- ``QuantizationAwareTraining`` (qat): the pretrained model is fine-tuned with fake-quantized Linears
  (torchao ``QATConfig``: per-token int8 activations, per-channel int8 weights), then converted to the
  same int8 format as dq.

Every Linear is quantized, the classification head included (the paper's ``{nn.Linear}``);
``quantize_classifier=false`` keeps the head fp32. Embeddings and LayerNorms stay fp32, as in the paper,
so the saved file shrinks much less than 4x. Quantized models run on CPU in fp32 arithmetic around int8
matmuls; the experiment evaluates them there (``eval_on_cpu``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.figures import collect_activations
from subgroup_robustness.models.structure import is_head
from subgroup_robustness.utils.errors import ConfigError

BACKENDS = ("torchao", "torch.ao")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao and the quantize_per_tensor family warn that they are deprecated on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*deprecated.*", category=UserWarning)
        yield


def linear_filter(quantize_classifier: bool = True):
    """torchao filter: every Linear, optionally without the classification head."""
    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or type(module).__name__ == "NonDynamicallyQuantizableLinear":
            return False
        return quantize_classifier or not is_head(fqn)
    return keep


def quantized_linears(model: nn.Module) -> dict[str, str]:
    """fqn -> storage dtype of each Linear-like module's weight (int8 after quantization)."""
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            out[fqn] = str(getattr(w, "qdata", w).dtype)
        elif hasattr(m, "_packed_params") and hasattr(m, "weight") and callable(m.weight):  # torch.ao dynamic
            out[fqn] = str(m.weight().dtype)
    return out


# ---- int8 x int8 products on CPUs without int8 dot-product instructions -------------------------------------
# |int8 x int8| <= 2**14, so every partial sum of at most 1024 such products is an integer of magnitude <= 2**24,
# which fp32 represents exactly: an fp32 matrix product over a K-slice of <= 1024 gives the exact int32 result,
# whatever order the BLAS adds in.
EXACT_K = 1024


def int8_mm_via_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` (int8 [M, K] x int8 [K, N] -> int32), bit for bit, from fp32 matrix products over
    K-slices of at most ``EXACT_K``. On a CPU without VNNI or AMX torch runs ``_int_mm`` as a scalar loop:
    on an AVX2-only AMD EPYC (2026-12-08) 1.7 GOP/s against 42-90 GFLOP/s for the same fp32 product, which
    made the static int8 model evaluate at 0.04x the fp32 model's rate."""
    out = None
    for k0 in range(0, a.shape[-1], EXACT_K):
        part = torch.mm(a[:, k0:k0 + EXACT_K].float(), b[k0:k0 + EXACT_K].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def slow_int_mm() -> bool:
    """Whether this CPU lacks the instructions torch's int8 products use (AVX512-VNNI or AMX): then torchao's
    int8 Linears (sq, qat, dq with backend=torchao) multiply through ``int8_mm_via_fp32``."""
    from torchao.utils import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported

    return not (_cpu_is_vnni_supported() or _cpu_is_amx_tile_supported())


def _scaled_int8_mm(original):
    def int_scaled_matmul(a: torch.Tensor, b: torch.Tensor, scales1: torch.Tensor) -> torch.Tensor:
        if a.device.type != "cpu":
            return original(a, b, scales1)
        return int8_mm_via_fp32(a, b).to(scales1.dtype) * scales1  # torchao's CPU s8s8 path, with the exact product
    int_scaled_matmul.sr_exact_fp32 = True
    return int_scaled_matmul


def int8_matmul_kernel() -> str:
    """Route torchao's CPU int8 x int8 products through ``int8_mm_via_fp32`` where ``_int_mm`` is slow (the
    same int32 results, tests/compression/test_quantization.py); returns which kernel int8 Linears use here.
    torchao 0.18 imports ``int_scaled_matmul`` into its int8 tensor's module, so that name is replaced there;
    if a later torchao moves it, nothing is patched and the reason is returned."""
    if not slow_int_mm():
        return "torch._int_mm"
    import importlib

    routed = False
    for name in ("torchao.quantization.quantize_.workflows.int8.int8_tensor", "torchao.quantization.utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, "int_scaled_matmul", None)
        if fn is not None and not getattr(fn, "sr_exact_fp32", False):
            module.int_scaled_matmul = _scaled_int8_mm(fn)
        routed = routed or fn is not None
    if not routed:
        return "torch._int_mm (slow here: torchao's int_scaled_matmul was not found to route it through fp32)"
    return "exact int8 products via fp32 matmul (no VNNI/AMX on this CPU)"


# ---- the three int8 methods ---------------------------------------------------------------------------
def dynamic_int8(model: nn.Module, backend: str = "torchao", quantize_classifier: bool = True) -> nn.Module:
    """Int8 weights, activations quantized per token at run time. Returns the (CPU) model."""
    if backend not in BACKENDS:
        raise ConfigError(f"dynamic int8: backend={backend!r}; use one of {BACKENDS}")
    model = model.to("cpu").eval()
    keep = linear_filter(quantize_classifier)
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        int8_matmul_kernel()
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=keep)
        return model
    with quiet():
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = {fqn: default_dynamic_qconfig for fqn, m in model.named_modules() if keep(m, fqn)}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def calibrate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], quantize_classifier: bool = True,
              observer: str = "histogram") -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Per Linear, the (scale, zero_point) of its input observed over ``batches``, shaped for the input's
    rank; and the number of examples seen."""
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

    kinds = {"histogram": HistogramObserver, "minmax": MinMaxObserver}
    if observer not in kinds:
        raise ConfigError(f"static int8: observer={observer!r}; use one of {sorted(kinds)}")
    keep = linear_filter(quantize_classifier)
    observers: dict[str, nn.Module] = {}
    ranks: dict[str, int] = {}

    def observe(fqn: str, module: nn.Module, x: torch.Tensor) -> None:
        if fqn not in observers:
            observers[fqn] = kinds[observer](dtype=torch.qint8, qscheme=torch.per_tensor_affine)
        ranks[fqn] = x.ndim
        observers[fqn](x.float().cpu())

    seen = collect_activations(model, batches, keep, observe)
    if not seen:
        raise ConfigError("static int8: no calibration batches (empty training split?); "
                          "check dataset.subsample or compressor.calibration_batches")
    qparams = {}
    for fqn, obs in observers.items():
        if fqn not in ranks:
            continue  # never called: stays fp32
        scale, zero_point = obs.calculate_qparams()
        shape = [1] * ranks[fqn]
        qparams[fqn] = (scale.float().reshape(shape), zero_point.to(torch.int8).reshape(shape))
    return qparams, seen


def static_int8(model: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Int8 weights (per row) and int8 inputs with the calibrated per-tensor scale of each Linear."""
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, PerRow, PerTensor, quantize_
    from torchao.quantization.quant_primitives import MappingType

    model = model.to("cpu").eval()
    int8_matmul_kernel()
    modules = dict(model.named_modules())
    for fqn, (scale, zero_point) in qparams.items():
        config = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=scale, act_quant_zero_point=zero_point, granularity=[PerTensor(), PerRow()],
            act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
        quantize_(modules[fqn], config, filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return model


def prepare_qat(model: nn.Module, quantize_classifier: bool = True) -> None:
    """Swap the Linears for fake-quantized ones (int8 per-token activations, per-channel weights)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    config = QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                       weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"), step="prepare")
    quantize_(model, config, filter_fn=linear_filter(quantize_classifier))


def convert_qat(model: nn.Module, quantize_classifier: bool = True) -> nn.Module:
    """Fake-quantized Linears back to plain ones, then to the int8 format the fake quantization simulated."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.quant_primitives import MappingType

    model = model.to("cpu").eval()
    int8_matmul_kernel()
    quantize_(model, QATConfig(step="convert"))
    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
    quantize_(model, config, filter_fn=linear_filter(quantize_classifier))
    return model


# ---- compressors ------------------------------------------------------------------------------------------
class _Int8(Compressor):
    family = "quantization"
    quantizes = True
    eval_on_cpu = True

    def __init__(self, quantize_classifier: bool = True):
        self.quantize_classifier = bool(quantize_classifier)
        self._extra: dict[str, Any] = {}

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        linears = quantized_linears(ctx.model)
        return {
            **self._extra,
            "int8_linear_layers": sum(v in ("torch.int8", "torch.qint8") for v in linears.values()),
            "fp32_linear_layers": sorted(k for k, v in linears.items() if v not in ("torch.int8", "torch.qint8")),
            # which kernel multiplies the int8 Linears (torch.ao's are fbgemm's; torchao's depend on the CPU)
            "int8_matmul": int8_matmul_kernel() if "torch.int8" in linears.values() else
            "fbgemm (torch.ao)" if "torch.qint8" in linears.values() else None,
        }


class DynamicInt8(_Int8):
    """Post-training dynamic int8 of the fine-tuned model; no further training (the paper's DQ)."""

    name = "dynamic_int8"
    stage = "after"
    start_from = "finetuned"

    def __init__(self, backend: str = "torchao", quantize_classifier: bool = True):
        if backend not in BACKENDS:
            raise ConfigError(f"dynamic int8: backend={backend!r}; use one of {BACKENDS}")
        super().__init__(quantize_classifier)
        self.backend = backend

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = dynamic_int8(ctx.model, self.backend, self.quantize_classifier)
        self._extra = {"method": "dynamic int8 (weights per row/tensor, activations per token at run time)"}
        return Compressed(model)


class StaticInt8(_Int8):
    """Post-training static int8, calibrated on the training split (all of it by default, as the paper;
    ``calibration_batches=N`` observes the first N batches); no further training (the paper's SQ)."""

    name = "static_int8"
    stage = "after"
    start_from = "finetuned"

    def __init__(self, calibration_batches: int | None = None, observer: str = "histogram",
                 quantize_classifier: bool = True, calibration: Any = None):
        if calibration_batches is not None and int(calibration_batches) < 1:
            raise ConfigError(f"static int8: calibration_batches={calibration_batches} must be >= 1, or null for the "
                              "whole training split (the paper)")
        if observer not in ("histogram", "minmax"):
            raise ConfigError(f"static int8: observer={observer!r}; use one of ['histogram', 'minmax']")
        super().__init__(quantize_classifier)
        self.calibration_batches = None if calibration_batches is None else int(calibration_batches)
        self.observer = observer
        # null: the paper's calibration (the training split, or its first calibration_batches batches);
        # {source, examples, seed}: a draw of data.calibration (natural | group_balanced | worst_group)
        if calibration is not None:
            from subgroup_robustness.data.calibration import check_calibration

            calibration = check_calibration(calibration, "static int8")
        self.calibration = calibration

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = ctx.model.to("cpu").eval()
        record = None
        t0 = time.perf_counter()
        if self.calibration is None:
            loader = ctx.data.train_dataloader()
            batches = loader if self.calibration_batches is None else \
                (b for i, b in zip(range(self.calibration_batches), loader))
        else:
            from subgroup_robustness.data.calibration import calibration_from_spec

            batches, record = calibration_from_spec(ctx.data, self.calibration, int(ctx.seed))
        qparams, seen = calibrate(model, batches, self.quantize_classifier, self.observer)
        self._extra = {"method": "static int8 (per-tensor asymmetric inputs, per-row weights)",
                       "calibration_examples": seen, "calibration_s": time.perf_counter() - t0}
        if record is not None:
            self._extra["calibration"] = record
        return Compressed(static_int8(model, qparams))


class QuantizationAwareTraining(_Int8):
    """Fine-tune the pretrained model with fake-quantized Linears, then convert to int8 (the paper's QAT).
    The fine-tuning runs in fp32 by default, as the paper's (fake quantization under bf16 autocast would
    simulate another arithmetic); ``precision=null`` uses the run's trainer precision."""

    name = "qat_int8"
    stage = "during"
    start_from = "pretrained"
    trains = True

    def __init__(self, quantize_classifier: bool = True, precision: str | None = "32-true"):
        super().__init__(quantize_classifier)
        self.fit_precision = precision

    def apply(self, ctx: CompressionContext) -> Compressed:
        prepare_qat(ctx.model, self.quantize_classifier)
        return Compressed(ctx.model)

    def finalize(self, ctx: CompressionContext) -> Compressed:
        self._extra = {"method": "quantization-aware fine-tuning (torchao QATConfig), then int8 dynamic-activation"}
        return Compressed(convert_qat(ctx.model, self.quantize_classifier))
