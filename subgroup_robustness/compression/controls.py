"""Matched-compute controls: settings that spend the same training as a compression setting without
compressing, so a delta can be read as "compression" rather than "more training".

- ``Refit`` (``compressor=refit``): continue fine-tuning the cached fine-tuned base exactly as the
  re-fine-tuning after head or magnitude pruning does (same epochs, learning rate, schedule, early stopping
  and best-epoch selection: the same experiment code path, with an unchanged model). The control of pr*,
  up* and any chain that re-fine-tunes after the base.
- The vocabulary-transfer control is ``VocabularyTransfer(keep_tokenizer=True)`` (``compressor=vtc``),
  and the distillation control ``TaskDistillation`` with every distillation weight 0 (``distill_ce``):
  they live with their methods.
"""

from __future__ import annotations

from typing import Any

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed


class Refit(Compressor):
    """Re-fine-tune the cached base without compressing it."""

    name = "refit"
    family = "control"
    stage = "after"
    start_from = "finetuned"
    trains = True

    def apply(self, ctx: CompressionContext) -> Compressed:
        return Compressed(ctx.model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        return {"control": "the cached base fine-tuned again as a post-training re-fine-tune, nothing removed"}
