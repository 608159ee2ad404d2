"""Per-group accuracy as a torchmetrics Metric: counts are summed across DDP processes, state stays on
the device (no host sync per step), and groups are masks so overlapping and empty groups are exact."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class GroupAccuracy(Metric):
    full_state_update = False

    def __init__(self, group_names: list[str], **kwargs):
        super().__init__(**kwargs)
        self.group_names = list(group_names)
        g = len(self.group_names)
        self.add_state("correct", default=torch.zeros(g, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(g, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("all_correct", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("all_total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> None:
        """preds, target: (B,); masks: (B, G) boolean group membership."""
        hit = (preds == target).long()
        m = masks.long()
        self.correct += (hit.unsqueeze(1) * m).sum(0)  # no integer matmul on CUDA
        self.total += m.sum(0)
        self.all_correct += hit.sum()
        self.all_total += hit.numel()

    def compute(self) -> dict:
        correct, total = self.correct.cpu().tolist(), self.total.cpu().tolist()
        acc = {n: (c / t if t else math.nan) for n, c, t in zip(self.group_names, correct, total)}
        present = [a for a in acc.values() if not math.isnan(a)]
        n_all = int(self.all_total)
        return {
            # average accuracy over all examples (count-weighted), as the paper and WILDS report it
            "acc_avg": int(self.all_correct) / n_all if n_all else math.nan,
            "acc_wg": min(present) if present else math.nan,
            "worst_group": min((n for n in acc if not math.isnan(acc[n])), key=acc.get) if present else None,
            "acc": acc,
            "count": dict(zip(self.group_names, total)),
            "n": n_all,
        }


def flatten_metrics(split: str, grouping: str | None, result: dict) -> dict[str, float]:
    """Keys like ``test/acc_avg``, ``test/acc_wg``, ``test/acc/<group>`` and ``test/count/<group>``;
    a secondary grouping gets its own prefix (``test/wilds16/acc_wg``). Absent groups get no acc key."""
    pre = f"{split}/" if grouping is None else f"{split}/{grouping}/"
    out: dict[str, float] = {}
    if grouping is None:
        out[f"{pre}acc_avg"] = result["acc_avg"]
    out[f"{pre}acc_wg"] = result["acc_wg"]
    for name, acc in result["acc"].items():
        if not math.isnan(acc):
            out[f"{pre}acc/{name}"] = acc
        out[f"{pre}count/{name}"] = float(result["count"][name])
    return out
