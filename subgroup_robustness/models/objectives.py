"""Training objectives. ERM is the paper's; group-aware objectives see the training groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Objective(nn.Module):
    """``forward(logits, labels, metadata) -> loss``. ``setup`` receives the primary grouping and the
    training-group counts before fitting, for objectives that need them."""

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name or type(self).__name__.lower()

    def setup(self, grouping, train_counts: torch.Tensor) -> None:  # noqa: D401 - optional hook
        self.grouping = grouping


class ERM(Objective):
    """Plain cross-entropy: the paper fine-tunes every model this way."""

    def forward(self, logits, labels, metadata):
        return F.cross_entropy(logits.float(), labels)
