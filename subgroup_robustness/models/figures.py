"""What a model costs: parameters, size (as the paper: the saved state dict), storage dtypes, heads, and
CPU latency. The experiment measures these before and after every compression stage, so every
compressor reports them without code of its own; ``collect_activations`` is the one hook-and-batch loop
that calibrating compressors (static int8, Wanda, SparseGPT) share."""

from __future__ import annotations

import io
import math
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from subgroup_robustness.models.structure import heads_per_layer, model_inputs


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


def cpu_latency_ms(model: nn.Module, batches: list[dict[str, torch.Tensor]] | Callable[[], Iterable], picks: int,
                   repeats: int = 3) -> float | None:
    """fp32 CPU latency per example over ``picks`` test batches spread across lengths (one warm-up, the
    fastest of ``repeats`` runs per batch, so a busy machine disturbs it less): the same measurement before
    and after every stage, whatever device or precision training used. ``batches`` is a list or a loader
    factory; None when there is nothing to measure."""
    if picks <= 0 or batches is None:
        return None
    loader = list(batches() if callable(batches) else batches)
    if not loader:
        return None
    chosen = sorted(set(np.linspace(0, len(loader) - 1, min(picks, len(loader))).round().astype(int).tolist()))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.to("cpu").eval()
    elapsed, n = 0.0, 0
    try:
        with torch.inference_mode():
            model(**model_inputs(loader[chosen[0]], "cpu"))
            for i in chosen:
                inputs = model_inputs(loader[i], "cpu")
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


def collect_activations(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                        select: Callable[[nn.Module, str], bool],
                        observe: Callable[[str, nn.Module, torch.Tensor], None]) -> int:
    """Run ``batches`` through ``model`` (eval mode, no grad) and call ``observe(fqn, module, input)`` with
    the input of every module ``select(module, fqn)`` accepts; returns the number of examples seen. The
    hooks are removed whatever happens."""
    hooks = []
    for fqn, m in model.named_modules():
        if select(m, fqn):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, fqn=fqn: observe(fqn, mod, args[0].detach())))
    seen = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                model(**model_inputs(batch, device))
                seen += int(batch["input_ids"].shape[0])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen
