"""Is this run a finding or a broken model? A run whose test predictions are (nearly) all one class, or whose
classification head or pooler is (nearly) all zeros, is *degenerate*: its accuracy is the majority rate and
its worst-group accuracy is 0 whatever the compression did to the encoder, so it must be flagged, never
ranked.

The head zeros case is what global L1 pruning over every Linear does at high sparsity: the head's and the
pooler's weights are several times smaller than the encoder's, so they are pruned first, and a zero
pooler makes the classifier's input the constant tanh(bias) whatever the text."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from subgroup_robustness.models.structure import is_head


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a LightningModule wrapper (``SequenceClassifier.model``), or ``model``."""
    inner = getattr(model, "model", None)
    if not hasattr(model, "config") and isinstance(inner, nn.Module) and hasattr(inner, "config"):
        return inner
    return model


def _dense_weight(module: nn.Module) -> torch.Tensor | None:
    """A module's own weight as a float tensor: plain, pruned (``weight`` = orig * mask), dynamically
    quantized (``weight()`` returns a quantized tensor) or a tensor subclass that can dequantize."""
    if "weight" not in module._parameters and "weight" not in module.__dict__ and not hasattr(type(module), "weight"):
        return None
    try:
        w = module.weight
        if callable(w) and not isinstance(w, torch.Tensor):
            w = w()
    except Exception:  # noqa: BLE001 - an exotic packed module: skip it rather than fail the run
        return None
    if isinstance(w, tuple):  # packed (weight, bias) of some quantized modules
        w = w[0]
    if not isinstance(w, torch.Tensor):
        return None
    if w.is_quantized:
        w = w.dequantize()
    elif type(w) not in (torch.Tensor, nn.Parameter) and hasattr(w, "dequantize"):
        w = w.dequantize()
    return w.detach()


def head_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> weight of every module of the classification head (``structure.is_head``) and of the pooler
    (``base_model.pooler``, when the model has one). Biases are left out: they start at zero."""
    hf = _hf_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in hf.named_modules():
        if name and is_head(name):
            w = _dense_weight(module)
            if w is not None:
                out[f"{name}.weight"] = w
    base = getattr(hf, "base_model", None)
    pooler = getattr(base, "pooler", None) if base is not None else None
    if isinstance(pooler, nn.Module):
        prefix = getattr(hf, "base_model_prefix", "") or ""
        for name, module in pooler.named_modules():
            w = _dense_weight(module)
            if w is not None:
                parts = [p for p in (prefix if base is not hf else "", "pooler", name) if p]
                out[".".join([*parts, "weight"])] = w
    return out


def zero_fractions(model: nn.Module) -> dict[str, float]:
    """Name -> fraction of exactly-zero entries of every head and pooler weight."""
    return {name: float((w == 0).sum()) / w.numel() for name, w in head_weights(model).items() if w.numel()}


def degeneracy(pred, num_classes: int, model: nn.Module | None = None, majority_threshold: float = 0.99,
               zero_threshold: float = 0.99, label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"degenerate": bool, "reasons": [str], "majority_fraction": float | None, "zero_fraction": {...}}``.

    Flagged when one class takes at least ``majority_threshold`` of the test predictions ("predicts 'biased'
    for 100.0% of 1719 test examples"), or, given the ``model``, when any weight of the classification head
    or of the pooler is at least ``zero_threshold`` zeros ("classifier.weight is 99.6% zeros"): one such
    matrix makes the logits (nearly) independent of the input. ``label_names`` name the classes in the
    reason (else their index)."""
    reasons: list[str] = []
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    majority = None
    if len(p):
        counts = np.bincount(p, minlength=max(int(num_classes), int(p.max()) + 1))
        top = int(counts.argmax())
        majority = float(counts[top] / len(p))
        if majority >= majority_threshold:
            name = label_names[top] if label_names is not None and top < len(label_names) else str(top)
            reasons.append(f"predicts '{name}' for {100 * majority:.1f}% of {len(p)} test examples")
    zeros: dict[str, float] = {}
    if model is not None:
        zeros = zero_fractions(model)
        for name, frac in zeros.items():
            if frac >= zero_threshold:
                reasons.append(f"{name} is {100 * frac:.1f}% zeros")
    return {"degenerate": bool(reasons), "reasons": reasons, "majority_fraction": majority, "zero_fraction": zeros}
