"""A toy compressor, exactly as docs/extending.md step 3 writes it: one-shot random unstructured pruning of
the encoder's Linear weights (a baseline that ignores weight importance), no re-fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.structure import encoder
from subgroup_robustness.utils.errors import ConfigError


class RandomPruning(Compressor):
    """Zero a random ``sparsity`` share of every encoder Linear's weights (seeded)."""

    name = "random_pruning"
    family = "pruning"
    stage = "after"            # acts on the fine-tuned model
    start_from = "finetuned"   # the cached fine-tuned base of the same dataset/model/seed
    trains = False             # one-shot: no re-fine-tuning

    def __init__(self, sparsity: float):
        if not 0.0 <= float(sparsity) < 1.0:  # checked when the chain is built, before any training
            raise ConfigError(f"random pruning: sparsity={sparsity} must be in [0, 1), e.g. 0.5")
        self.sparsity = float(sparsity)
        self._zeroed = 0

    def apply(self, ctx: CompressionContext) -> Compressed:
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for m in encoder(ctx.model).modules():
                if isinstance(m, nn.Linear):
                    keep = torch.rand(m.weight.shape, generator=gen) >= self.sparsity
                    m.weight.mul_(keep.to(m.weight.dtype))
                    self._zeroed += int((~keep).sum())
        return Compressed(ctx.model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        return {"weights_zeroed": self._zeroed, "sparsity_target": self.sparsity}
