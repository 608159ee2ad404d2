"""The compressor interface, and how a model's size is measured (as the paper: the saved state dict).

A compressor declares *when* it acts:
- ``before``: changes the pretrained model before fine-tuning (vocabulary transfer, student construction);
- ``during``: changes how fine-tuning runs (quantization-aware training, distillation losses);
- ``after``: acts on the fine-tuned model (head pruning + re-fine-tuning, post-training quantization).

The experiment runs stages in that order. Each stage's ``apply`` edits ``ctx.model`` / ``ctx.tokenizer``;
if ``trains`` is set the experiment then fine-tunes (with ``configure_module`` hooks attached) and calls
``finalize``. ``start_from`` says whether the first stage wants the pretrained model or the cached
fine-tuned base of the same dataset/model/seed.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.experiment import RunContext
    from subgroup_robustness.models.classifier import SequenceClassifier

STAGES = ("before", "during", "after")


class Compressor:
    name: ClassVar[str] = "compressor"
    family: ClassVar[str] = "none"
    stage: ClassVar[str] = "after"
    start_from: ClassVar[str] = "finetuned"  # or "pretrained"
    trains: ClassVar[bool] = False           # fine-tune after apply()
    quantizes: ClassVar[bool] = False        # the result has int8 weights: nothing may train after it
    eval_on_cpu: ClassVar[bool] = False      # quantized kernels run on CPU (as in the paper)

    def apply(self, ctx: "RunContext") -> None:
        """Edit ctx.model / ctx.tokenizer (default: nothing)."""

    def configure_module(self, ctx: "RunContext", module: "SequenceClassifier") -> None:
        """Attach loss hooks or flags before the fine-tuning that follows ``apply`` (default: nothing)."""

    def finalize(self, ctx: "RunContext") -> None:
        """After that fine-tuning (default: nothing)."""

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def report(self, ctx: "RunContext") -> dict[str, Any]:
        """Method-specific figures for results.json (heads kept, sparsity, vocabulary size, ...)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def count_parameters(model: nn.Module) -> int:
    """Float parameters, as the paper counts them (packed int8 weights are not nn.Parameters; torchao's
    int8 weights are, but store their data in ``qdata``)."""
    return sum(p.numel() for p in model.parameters() if getattr(p, "qdata", p).dtype.is_floating_point)


def weight_dtypes(model: nn.Module) -> dict[str, int]:
    """Elements per storage dtype over the state dict, e.g. {'torch.float32': ..., 'torch.qint8': ...}."""
    out: dict[str, int] = {}
    for value in model.state_dict().values():
        tensors = []
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, tuple):  # packed params of torch.ao dynamic Linear
            tensors.extend(v for v in value if isinstance(v, torch.Tensor))
        for t in tensors:
            inner = getattr(t, "qdata", None)  # torchao tensor subclasses keep int8 data inside
            dtype = str(inner.dtype) if isinstance(inner, torch.Tensor) else str(t.dtype)
            out[dtype] = out.get(dtype, 0) + t.numel()
    return out


def model_figures(model: nn.Module) -> dict[str, Any]:
    """Size and shape figures of a (possibly compressed) model for the compression report."""
    cfg = getattr(model, "config", None)
    size = state_dict_bytes(model)
    out: dict[str, Any] = {
        "params": count_parameters(model),
        "size_bytes": size,
        "size_mb": size / 1e6,
        "weight_dtypes": weight_dtypes(model),
    }
    if cfg is not None:
        out.update({
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "heads_per_layer": heads_per_layer(model),
        })
    return out


def heads_per_layer(model: nn.Module) -> list[int] | None:
    heads = []
    for module in model.modules():
        if hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads"):
            heads.append(int(module.num_attention_heads))
    return heads or None


class NoCompression(Compressor):
    """The uncompressed baseline: fine-tune the pretrained model (the paper's BERT_Base row)."""

    name = "none"
    family = "none"
    stage = "before"
    start_from = "pretrained"
    trains = True
