"""Training objectives. ERM is the paper's; group-aware objectives see the training groups.

Every fine-tuning of a run (the base, re-fine-tuning after pruning, QAT, distillation) builds its module
through ``RunContext.new_module`` with ``cfg.objective``, and ``RunContext.fit`` calls ``setup`` with
the primary grouping and the training-group counts, so an objective applies to all of them."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from subgroup_robustness.utils.errors import ConfigError

log = logging.getLogger(__name__)


class Objective(nn.Module):
    """``forward(logits, labels, metadata) -> loss``. ``setup`` receives the primary grouping and the
    training-group counts before fitting, for objectives that need them."""

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name or type(self).__name__.lower()
        self.grouping = None

    def setup(self, grouping, train_counts: torch.Tensor) -> None:  # noqa: D401 - optional hook
        self.grouping = grouping

    def epoch_log(self) -> dict[str, float]:
        """Values the module logs at the end of each training epoch (default: none)."""
        return {}


class ERM(Objective):
    """Plain cross-entropy: the paper fine-tunes every model this way."""

    def forward(self, logits, labels, metadata):
        return F.cross_entropy(logits.float(), labels)


class _GroupObjective(Objective):
    """Shared by objectives that need one group per training example."""

    def setup(self, grouping, train_counts: torch.Tensor) -> None:
        if not grouping.disjoint:
            raise ConfigError(
                f"objective {self.name!r} needs one group per example, but the primary grouping "
                f"{grouping.name!r} overlaps ({grouping.n_groups} groups from `each:`). Give the dataset a "
                "disjoint `groupings.groups` (`by: [...]`) or use objective=erm."
            )
        counts = torch.as_tensor(train_counts, dtype=torch.float64).flatten()
        if counts.numel() != grouping.n_groups:
            raise ValueError(f"{counts.numel()} training counts for {grouping.n_groups} groups")
        if counts.sum() <= 0:
            raise ConfigError(f"objective {self.name!r}: the training split has no example in any group")
        empty = [g for g, c in zip(grouping.group_names, counts.tolist()) if c == 0]
        if empty:
            log.warning("objective %s: training groups %s are empty; they get no weight", self.name, empty)
        super().setup(grouping, counts)
        self.group_names = list(grouping.group_names)
        self.train_counts = counts

    def _group_ids(self, metadata: torch.Tensor) -> torch.Tensor:
        if self.grouping is None:
            raise RuntimeError(f"objective {self.name!r} was used before setup(); RunContext.fit calls it")
        return self.grouping.group_ids(metadata)

    def _group_means(self, losses: torch.Tensor, gid: torch.Tensor):
        """Per-group mean loss and count of the batch (examples in no group count nowhere)."""
        onehot = (gid.unsqueeze(1) == torch.arange(len(self.group_names), device=gid.device)).to(losses.dtype)
        counts = onehot.sum(0)
        return onehot.T @ losses / counts.clamp(min=1), counts


class GroupReweight(_GroupObjective):
    """Importance-weighted ERM: each example's loss is weighted inversely to its training group's size,
    so every group counts equally in expectation (the group-balanced risk)."""

    def setup(self, grouping, train_counts: torch.Tensor) -> None:
        super().setup(grouping, train_counts)
        self.register_buffer("weights", group_balancing_weights(self.train_counts).float())

    def forward(self, logits, labels, metadata):
        gid = self._group_ids(metadata)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        w = torch.where(gid >= 0, self.weights[gid.clamp(min=0)], torch.zeros_like(losses))
        return (w * losses).mean()  # a batch mean of weighted losses: unbiased for the balanced risk


def group_balancing_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_g = N / (G n_g) over the G non-empty groups: inverse frequency, normalised so that the mean
    weight over the training examples is 1 (the loss keeps ERM's scale, so the learning rate carries over)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    nonempty = counts > 0
    w = torch.zeros_like(counts)
    w[nonempty] = counts.sum() / (nonempty.sum() * counts[nonempty])
    return w


class GroupDRO(_GroupObjective):
    """Online group DRO (Sagawa et al. 2020, group_DRO's ``LossComputer.compute_robust_loss``): each step
    q_g <- q_g exp(step_size (L_g + C / sqrt(n_g))), q normalised, and the loss is sum_g q_g L_g.

    ``q`` is a buffer: it follows the module's device, lands in checkpoints and is logged each epoch as
    ``train/dro_q/<group>``. Under DDP the group losses behind the update are summed over processes, so
    every process keeps the same q."""

    def __init__(self, step_size: float = 0.01, adjustment: float = 0.0, name: str | None = None):
        super().__init__(name=name)
        if step_size <= 0:
            raise ConfigError(f"objective.step_size must be > 0 (group_DRO uses 0.01), got {step_size}")
        if adjustment < 0:
            raise ConfigError(f"objective.adjustment (C) must be >= 0, got {adjustment}")
        self.step_size, self.adjustment = float(step_size), float(adjustment)

    def setup(self, grouping, train_counts: torch.Tensor) -> None:
        super().setup(grouping, train_counts)
        n = self.train_counts
        nonempty = n > 0
        q = nonempty.double() / nonempty.sum()
        adj = torch.zeros_like(n)
        if self.adjustment > 0:
            adj[nonempty] = self.adjustment / n[nonempty].sqrt()
        self.register_buffer("q", q.float())
        self.register_buffer("adj", adj.float())
        self._epoch_loss = torch.zeros_like(n)
        self._epoch_count = torch.zeros_like(n)

    def forward(self, logits, labels, metadata):
        gid = self._group_ids(metadata)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        group_loss, counts = self._group_means(losses, gid)
        if self.training:
            self.update(group_loss.detach(), counts)
        return group_loss @ self.q.clone()  # the step's own q, even if forward runs again before backward

    @torch.no_grad()
    def update(self, group_loss: torch.Tensor, counts: torch.Tensor) -> None:
        """The exponentiated-gradient step on q (in log space, so large steps cannot overflow)."""
        sums, counts = group_loss * counts, counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        mean = sums / counts.clamp(min=1)
        self._epoch_loss += sums.double().cpu()
        self._epoch_count += counts.double().cpu()
        logits = torch.log(self.q) + self.step_size * (mean + self.adj)  # log 0 = -inf keeps empty groups at 0
        self.q.copy_(torch.softmax(logits, dim=0))

    def epoch_log(self) -> dict[str, float]:
        out = {f"train/dro_q/{g}": float(v) for g, v in zip(self.group_names, self.q.tolist())}
        seen = self._epoch_count > 0
        for g, s, c, ok in zip(self.group_names, self._epoch_loss.tolist(), self._epoch_count.tolist(), seen.tolist()):
            if ok:
                out[f"train/dro_loss/{g}"] = s / c
        self._epoch_loss.zero_()
        self._epoch_count.zero_()
        return out
