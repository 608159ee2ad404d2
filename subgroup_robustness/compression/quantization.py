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
import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.utils.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.experiment import RunContext

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_MODULES = ("classifier", "pre_classifier", "score")
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
        return quantize_classifier or fqn.split(".")[0] not in HEAD_MODULES
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


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def cpu_latency_ms(model: nn.Module, datamodule, batches: int, repeats: int = 3) -> float | None:
    """fp32 CPU latency per example over ``batches`` test batches spread across lengths (one warm-up,
    the fastest of ``repeats`` runs per batch, so a busy machine disturbs it less): the same measurement
    before and after compression, whatever device or precision training used."""
    if batches <= 0 or datamodule is None:
        return None
    loader = list(datamodule.test_dataloader())
    if not loader:
        return None
    picks = sorted(set(np.linspace(0, len(loader) - 1, min(batches, len(loader))).round().astype(int).tolist()))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.to("cpu").eval()
    elapsed, n = 0.0, 0
    try:
        with torch.inference_mode():
            model(**model_inputs(loader[picks[0]]))
            for i in picks:
                inputs = model_inputs(loader[i])
                best = math.inf
                for _ in range(max(1, repeats)):
                    t0 = time.perf_counter()
                    model(**inputs)
                    best = min(best, time.perf_counter() - t0)
                elapsed += best
                n += inputs["input_ids"].shape[0]
    finally:
        model.to(device)
        model.train(was_training)
    return 1000.0 * elapsed / max(1, n)


# ---- the three int8 methods ---------------------------------------------------------------------------
def dynamic_int8(model: nn.Module, backend: str = "torchao", quantize_classifier: bool = True) -> nn.Module:
    """Int8 weights, activations quantized per token at run time. Returns the (CPU) model."""
    if backend not in BACKENDS:
        raise ConfigError(f"dynamic int8: backend={backend!r}; use one of {BACKENDS}")
    model = model.to("cpu").eval()
    keep = linear_filter(quantize_classifier)
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

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
    hooks = []
    for fqn, m in model.named_modules():
        if keep(m, fqn):
            observers[fqn] = kinds[observer](dtype=torch.qint8, qscheme=torch.per_tensor_affine)

            def hook(module, args, fqn=fqn):
                x = args[0].detach().float()
                ranks[fqn] = x.ndim
                observers[fqn](x.cpu())
            hooks.append(m.register_forward_pre_hook(hook))
    seen = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**model_inputs(batch, next(model.parameters()).device))
                seen += batch["input_ids"].shape[0]
    finally:
        for h in hooks:
            h.remove()
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
    quantize_(model, QATConfig(step="convert"))
    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
    quantize_(model, config, filter_fn=linear_filter(quantize_classifier))
    return model


# ---- compressors ------------------------------------------------------------------------------------------
class _Int8(Compressor):
    family = "quantization"
    quantizes = True
    eval_on_cpu = True

    def __init__(self, quantize_classifier: bool = True, latency_batches: int = 4):
        self.quantize_classifier = bool(quantize_classifier)
        self.latency_batches = int(latency_batches)
        self._latency_before: float | None = None
        self._extra: dict[str, Any] = {}

    def report(self, ctx: "RunContext") -> dict[str, Any]:
        linears = quantized_linears(ctx.model)
        return {
            **self._extra,
            "int8_linear_layers": sum(v in ("torch.int8", "torch.qint8") for v in linears.values()),
            "fp32_linear_layers": sorted(k for k, v in linears.items() if v not in ("torch.int8", "torch.qint8")),
            "cpu_latency_ms_per_example": {"before": self._latency_before,
                                           "after": cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)},
        }


class DynamicInt8(_Int8):
    """Post-training dynamic int8 of the fine-tuned model; no further training (the paper's DQ)."""

    name = "dynamic_int8"
    stage = "after"
    start_from = "finetuned"

    def __init__(self, backend: str = "torchao", quantize_classifier: bool = True, latency_batches: int = 4):
        if backend not in BACKENDS:
            raise ConfigError(f"dynamic int8: backend={backend!r}; use one of {BACKENDS}")
        super().__init__(quantize_classifier, latency_batches)
        self.backend = backend

    def apply(self, ctx: "RunContext") -> None:
        self._latency_before = cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)
        ctx.model = dynamic_int8(ctx.model, self.backend, self.quantize_classifier)
        self._extra = {"method": "dynamic int8 (weights per row/tensor, activations per token at run time)"}


class StaticInt8(_Int8):
    """Post-training static int8, calibrated on training batches; no further training (the paper's SQ)."""

    name = "static_int8"
    stage = "after"
    start_from = "finetuned"

    def __init__(self, calibration_batches: int = 100, observer: str = "histogram", quantize_classifier: bool = True,
                 latency_batches: int = 4):
        if int(calibration_batches) < 1:
            raise ConfigError(f"static int8: calibration_batches={calibration_batches} must be >= 1")
        super().__init__(quantize_classifier, latency_batches)
        self.calibration_batches = int(calibration_batches)
        self.observer = observer

    def apply(self, ctx: "RunContext") -> None:
        self._latency_before = cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)
        model = ctx.model.to("cpu").eval()
        loader = ctx.datamodule.train_dataloader()
        batches = (b for i, b in zip(range(self.calibration_batches), loader))
        t0 = time.perf_counter()
        qparams, seen = calibrate(model, batches, self.quantize_classifier, self.observer)
        ctx.model = static_int8(model, qparams)
        self._extra = {"method": "static int8 (per-tensor asymmetric inputs, per-row weights)",
                       "calibration_examples": seen, "calibration_s": time.perf_counter() - t0}


class QuantizationAwareTraining(_Int8):
    """Fine-tune the pretrained model with fake-quantized Linears, then convert to int8 (the paper's QAT)."""

    name = "qat_int8"
    stage = "during"
    start_from = "pretrained"
    trains = True

    def apply(self, ctx: "RunContext") -> None:
        prepare_qat(ctx.model, self.quantize_classifier)

    def finalize(self, ctx: "RunContext") -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        model = ctx.model.to("cpu").eval()
        quantize_(model, QATConfig(step="convert"))  # plain fp32 Linears with the trained weights
        self._latency_before = cpu_latency_ms(model, ctx.datamodule, self.latency_batches)
        ctx.model = convert_qat(model, self.quantize_classifier)  # its convert step is now a no-op
        self._extra = {"method": "quantization-aware fine-tuning (torchao QATConfig), then int8 dynamic-activation"}
