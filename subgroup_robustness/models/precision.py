"""bf16 autocast with the weight-cast cache on for training steps.

Lightning's ``MixedPrecision`` opens autocast with ``cache_enabled=False``. Without the cache every
linear layer casts its fp32 weight to bf16 afresh and autograd records and later differentiates each of
those casts; with it, a step costs ~13 % less on a 2-core AVX-512 CPU (MiniLM-L6, batch 32:
benchmarks/bench_train.py, where the plain loop uses the cache). The cache is only wrong when one
autocast region runs the same weights first without grad and then with grad (the no-grad cast would be
reused and the weights would get no gradient); a training step runs the trained model once with grad,
and evaluation (no grad, inference mode) keeps the cache off, as Lightning does."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision


class CachedBF16Autocast(MixedPrecision):
    def __init__(self, device: str = "cpu"):
        super().__init__(precision="bf16-mixed", device=device)

    def autocast_context_manager(self) -> torch.autocast:
        training = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        return torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=training)


def precision_plugin(precision: str, accelerator: str | None) -> CachedBF16Autocast | None:
    """The plugin that replaces Lightning's own for ``precision`` (None: keep Lightning's)."""
    if str(precision) not in ("bf16-mixed", "bf16"):
        return None
    acc = str(accelerator or "auto")
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
    device = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(acc)
    return CachedBF16Autocast(device) if device else None  # mps, tpu, ...: Lightning knows best
