"""Weight-only and W8A8 quantization of the fine-tuned model through torchao (pinned: torchao>=0.18,<0.19),
evaluated on CPU; nothing is trained after them.

- ``Int8WeightOnly`` (int8wo): torchao ``Int8WeightOnlyConfig(granularity=PerRow())``: int8 weights with
  one symmetric scale per output row, fp32 activations; on CPU the int8 weight is cast to fp32 inside each
  matmul (torchao's weight-only path), so it saves memory, not time.
- ``Int4WeightOnly`` (int4wo): 4-bit weights, asymmetric, one (scale, zero) pair per group of
  ``group_size`` inputs (tinygemm convention ``w = (q - 8) * scale + zero``, the qparams chosen with
  torchao's ``_choose_qparams_affine_tinygemm`` / ``_quantize_affine_tinygemm``).
  ``layout=cpu_int4pack`` (default) packs two 4-bit values per byte with ATen's CPU kernel pair
  ``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu`` (real 4-bit storage and a
  real CPU int4 matmul). The kernel multiplies in ``compute_dtype``: bfloat16 by default (activations cast
  to bf16 and back: its vectorised path; with float32 activations it runs a scalar path, ~60-150x slower
  than fp32 sgemm on this machine; bf16 is ~2-3x slower than fp32 sgemm at encoder batch sizes, since the
  kernel is built for small-batch decoding). torchao 0.18's own ``Int4WeightOnlyConfig`` cannot run on this
  CPU build: ``plain``/``preshuffled`` need the CUDA-only ``mslk`` package ("Requires mslk >= 1.0.0"),
  ``plain_int32`` raises "Int4PlainInt32Tensor does not support device 'cpu' yet", and
  ``tile_packed_to_4d`` (tinygemm) accepts only bfloat16 and then needs CUDA ("Torch not compiled with
  CUDA enabled"); 0.18 removed the ``Int4CPULayout`` older releases wrapped around exactly these ATen
  CPU ops. ``layout=intx_unpacked`` is torchao 0.18's CPU-runnable alternative
  (``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))``): int4 values
  stored one per int8 byte and dequantized per matmul (int4 accuracy, int8 size). ATen's packer needs the
  output features to be a multiple of 16 and the inputs a multiple of ``group_size``: smaller layers
  (e.g. a 2-way classifier) are zero-padded to that shape, and the output sliced back.
- ``W8A8`` (w8a8): torchao ``Int8DynamicActivationInt8WeightConfig``: int8 per-row weights and int8
  per-token activations quantized at run time (the scheme ``dq``'s torchao backend uses).

Every Linear is quantized, the classification head included (as ``dq``: the paper's ``{nn.Linear}``);
``quantize_classifier=false`` keeps the head fp32. Embeddings and LayerNorms stay fp32. Size, storage
dtypes and CPU latency before/after are measured by the experiment.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.compression.quantization import linear_filter
from subgroup_robustness.utils.errors import ConfigError

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_LAYOUTS = ("cpu_int4pack", "intx_unpacked")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
N_MULTIPLE = 16  # ATen's CPU int4 packer: output features in multiples of 16


def storage_dtypes(model: nn.Module) -> dict[str, str]:
    """fqn -> storage dtype of each quantized or plain Linear's weight."""
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, Int4PackedLinear):
            out[fqn] = "int4 (packed uint8)"
        elif isinstance(m, nn.Linear):
            w = m.weight
            inner = getattr(w, "qdata", w)
            name = type(w).__name__
            out[fqn] = f"{inner.dtype}" + (f" ({name})" if name not in ("Parameter", "Tensor") else "")
    return out


# ---- int4 on ATen's CPU kernel -------------------------------------------------------------------------
class Int4PackedLinear(nn.Module):
    """A Linear with 4-bit grouped weights packed two per byte for ATen's CPU int4 matmul
    (``_weight_int4pack_mm_for_cpu``). Buffers: ``weight_int4pack`` (uint8, ``[N_pad, K_pad / 2]``),
    ``scales_and_zeros`` (``[K_pad / group, N_pad, 2]`` in the compute dtype), and the bias (fp32). The
    kernel multiplies in ``compute_dtype``: bfloat16 by default, its vectorised path (float32 activations
    run a scalar path, ~60x slower here); the output is cast back to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = int(in_features), int(out_features), int(group_size)
        self.compute_dtype = compute_dtype
        self.k_pad = -(-self.in_features // self.group_size) * self.group_size
        self.n_pad = -(-self.out_features // N_MULTIPLE) * N_MULTIPLE
        self.register_buffer("weight_int4pack", torch.zeros(self.n_pad, self.k_pad // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(self.k_pad // self.group_size, self.n_pad, 2,
                                                             dtype=compute_dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int4PackedLinear":
        from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                           _quantize_affine_tinygemm)
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        out = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, compute_dtype)
        w = linear.weight.detach().float().cpu()
        w = F.pad(w, (0, out.k_pad - out.in_features, 0, out.n_pad - out.out_features))
        block = (1, group_size)
        # qparams in the dtype the kernel reads them in, so the rounding matches what it computes with
        scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                      scale_dtype=compute_dtype, zero_point_dtype=compute_dtype)
        q = _quantize_affine_tinygemm(w, block, scale.float(), zero.float(), torch.int32, 0, 15)
        out.weight_int4pack.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        out.scales_and_zeros.copy_(pack_tinygemm_scales_and_zeros(scale.reshape(out.n_pad, -1),
                                                                  zero.reshape(out.n_pad, -1), compute_dtype))
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach().float().cpu())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the kernel computes with, ``(q - 8) * scale + zero``, in float32 (for checks)."""
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # [K/group, N_pad] each
        eye = torch.eye(self.k_pad, dtype=torch.float32, device=self.weight_int4pack.device)
        ones = torch.stack([torch.ones_like(scale), torch.zeros_like(zero)], -1)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4pack, self.group_size, ones)
        q = q.t()  # [N_pad, K_pad]: q - 8
        w = q * scale.t().repeat_interleave(self.group_size, 1) + zero.t().repeat_interleave(self.group_size, 1)
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_int4pack, self.group_size,
                                                       self.scales_and_zeros)
        y = y[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"int4 packed (ATen CPU), compute {str(self.compute_dtype).replace('torch.', '')}")


def int4_cpu_supported(dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """Whether ATen's CPU int4 matmul runs in this torch build (and why not)."""
    try:
        q = torch.zeros(N_MULTIPLE, 32, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 32, dtype=dtype), packed, 32,
                                                   torch.ones(1, N_MULTIPLE, 2, dtype=dtype))
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means: use the other layout
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def int4_weight_only(model: nn.Module, group_size: int = 32, layout: str = "cpu_int4pack",
                     quantize_classifier: bool = True, compute_dtype: str = "bfloat16") -> nn.Module:
    """Every selected Linear with 4-bit grouped weights (see the module docstring). Returns the CPU model."""
    model = model.to("cpu").eval()
    keep = linear_filter(quantize_classifier)
    if layout == "intx_unpacked":
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType

        fits = lambda m, fqn: keep(m, fqn) and m.in_features % group_size == 0  # noqa: E731
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                              mapping_type=MappingType.ASYMMETRIC), filter_fn=fits)
        return model
    if layout != "cpu_int4pack":
        raise ConfigError(f"int4 weight-only: layout={layout!r}; use one of {list(INT4_LAYOUTS)}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    ok, why = int4_cpu_supported(dtype)
    if not ok:
        raise ConfigError(f"int4 weight-only: ATen's CPU int4 kernel does not run in this torch build ({why}); "
                          "use compressor.layout=intx_unpacked")
    for fqn, m in list(model.named_modules()):
        if keep(m, fqn):
            parent_name, _, attr = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, Int4PackedLinear.from_linear(m, group_size, dtype))
    return model


# ---- compressors --------------------------------------------------------------------------------------
class _WeightQuant(Compressor):
    family = "quantization"
    stage = "after"
    start_from = "finetuned"
    trains = False
    quantizes = True
    eval_on_cpu = True
    method: ClassVar[str] = ""

    def __init__(self, quantize_classifier: bool = True):
        if not isinstance(quantize_classifier, bool):
            raise ConfigError(f"{self.name}: quantize_classifier={quantize_classifier!r} must be true or false")
        self.quantize_classifier = quantize_classifier

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        dtypes = storage_dtypes(ctx.model)
        plain = sorted(k for k, v in dtypes.items() if v == "torch.float32")
        return {"method": self.method, "quantized_linear_layers": len(dtypes) - len(plain),
                "fp32_linear_layers": plain, "linear_storage": sorted(set(dtypes.values())),
                "torchao": _torchao_version()}


def _torchao_version() -> str:
    try:
        import torchao

        return str(torchao.__version__)
    except Exception:  # noqa: BLE001
        return "unavailable"


class Int8WeightOnly(_WeightQuant):
    """int8 per-row weights, fp32 activations (torchao Int8WeightOnlyConfig)."""

    name = "int8_weight_only"
    method = "int8 weight-only, symmetric per output row (torchao Int8WeightOnlyConfig(PerRow))"

    def apply(self, ctx: CompressionContext) -> Compressed:
        from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_

        model = ctx.model.to("cpu").eval()
        quantize_(model, Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False),
                  filter_fn=linear_filter(self.quantize_classifier))
        return Compressed(model)


class Int4WeightOnly(_WeightQuant):
    """4-bit grouped weights, fp32 activations, on ATen's CPU int4 kernel (or torchao's intx layout)."""

    name = "int4_weight_only"

    def __init__(self, group_size: int = 32, layout: str = "cpu_int4pack", compute_dtype: str = "bfloat16",
                 quantize_classifier: bool = True):
        super().__init__(quantize_classifier)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"int4 weight-only: compute_dtype={compute_dtype!r}; use one of {list(COMPUTE_DTYPES)}")
        self.compute_dtype = compute_dtype
        try:
            self.group_size = int(group_size)
        except (TypeError, ValueError):
            raise ConfigError(f"int4 weight-only: group_size={group_size!r} is not a number") from None
        if self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 weight-only: group_size={group_size}; use one of {list(INT4_GROUP_SIZES)} "
                              "(the kernels' group sizes)")
        if layout not in INT4_LAYOUTS:
            raise ConfigError(f"int4 weight-only: layout={layout!r}; use one of {list(INT4_LAYOUTS)}")
        self.layout = layout

    @property
    def method(self) -> str:  # type: ignore[override]
        if self.layout == "cpu_int4pack":
            return (f"int4 weight-only, asymmetric, group {self.group_size}: packed 2/byte, ATen CPU kernel "
                    f"_weight_int4pack_mm_for_cpu computing in {self.compute_dtype} (qparams: torchao tinygemm "
                    "primitives)")
        return (f"int4 weight-only, asymmetric, group {self.group_size}: torchao IntxWeightOnlyConfig "
                "(int4 values stored in int8, dequantized per matmul)")

    def apply(self, ctx: CompressionContext) -> Compressed:
        return Compressed(int4_weight_only(ctx.model, self.group_size, self.layout, self.quantize_classifier,
                                           self.compute_dtype))


class W8A8(_WeightQuant):
    """int8 per-row weights x int8 per-token dynamic activations (torchao Int8DynamicActivationInt8WeightConfig)."""

    name = "w8a8_dynamic"
    method = ("int8 weights per row x int8 activations per token, quantized at run time "
              "(torchao Int8DynamicActivationInt8WeightConfig)")

    def apply(self, ctx: CompressionContext) -> Compressed:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = ctx.model.to("cpu").eval()
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
                  filter_fn=linear_filter(self.quantize_classifier))
        return Compressed(model)
