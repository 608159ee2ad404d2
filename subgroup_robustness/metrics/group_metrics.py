"""Per-group accuracy as a torchmetrics Metric: counts are summed across DDP processes, state stays on
the device (no host sync per step), and groups are masks so overlapping and empty groups are exact.
Multi-label datasets (``dataset.task: multilabel``) get per-group micro-/macro-F1 instead
(``GroupMultiLabelF1``, below)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric


class GroupAccuracy(Metric):
    full_state_update = False

    def __init__(self, group_names: list[str], row_average: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.group_names = list(group_names)
        # ``average: rows`` groupings: also the average over one row per (example, group) pair (groups.py)
        self.row_average = bool(row_average)
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
        out = {
            # average accuracy over all examples (count-weighted), as the paper and WILDS report it
            "acc_avg": int(self.all_correct) / n_all if n_all else math.nan,
            # the minimum over the groups with examples; the empty ones are listed, never silently dropped
            "acc_wg": min(present) if present else math.nan,
            "worst_group": min((n for n in acc if not math.isnan(acc[n])), key=acc.get) if present else None,
            "acc": acc,
            "count": dict(zip(self.group_names, total)),
            "n": n_all,
            "empty": [n for n, t in zip(self.group_names, total) if not t],
        }
        if self.row_average:
            rows = sum(total)
            out["acc_avg_rows"] = sum(correct) / rows if rows else math.nan
            out["rows"] = rows
        return out


def flatten_metrics(split: str, grouping: str | None, result: dict) -> dict[str, float]:
    """Keys like ``test/acc_avg``, ``test/acc_wg``, ``test/acc/<group>`` and ``test/count/<group>``;
    a secondary grouping gets its own prefix (``test/wilds16/acc_wg``). Absent groups get no acc key (their
    count, 0, says they are empty). An ``average: rows`` grouping adds ``<pre>acc_avg_rows``.
    A multi-label result (``GroupMultiLabelF1``) gets its own keys (``flatten_multilabel``)."""
    if is_multilabel_result(result):
        return flatten_multilabel(split, grouping, result)
    pre = f"{split}/" if grouping is None else f"{split}/{grouping}/"
    out: dict[str, float] = {}
    if grouping is None:
        out[f"{pre}acc_avg"] = result["acc_avg"]
    if "acc_avg_rows" in result:  # inflated: one row per (example, group) pair (``average: rows``)
        out[f"{pre}acc_avg_rows"] = result["acc_avg_rows"]
    out[f"{pre}acc_wg"] = result["acc_wg"]
    for name, acc in result["acc"].items():
        if not math.isnan(acc):
            out[f"{pre}acc/{name}"] = acc
        out[f"{pre}count/{name}"] = float(result["count"][name])
    return out


# ---- multi-label (dataset.task: multilabel) ---------------------------------------------------------------
MULTILABEL = "multilabel"


def bits(mask: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(B,) label-set bitmasks -> (B, C) multi-hot long tensor (bit k = label k)."""
    shifts = torch.arange(num_labels, device=mask.device)
    return (mask.long().unsqueeze(-1) >> shifts) & 1


def to_bitmask(multi_hot: torch.Tensor) -> torch.Tensor:
    """(B, C) multi-hot (bool or 0/1) -> (B,) long bitmasks."""
    shifts = torch.arange(multi_hot.shape[-1], device=multi_hot.device)
    return (multi_hot.long() << shifts).sum(-1)


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """2TP / (2TP + FP + FN), 0 where the denominator is 0 (scikit-learn's ``zero_division=0``, as FairLex)."""
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp.double() / den.clamp(min=1).double(), torch.zeros_like(den, dtype=torch.float64))


class GroupMultiLabelF1(Metric):
    """Per-group micro- and macro-F1 of multi-label predictions, FairLex's way (Chalkidis et al. 2022, whose
    code scores ``sklearn.metrics.f1_score(..., zero_division=0)`` on 0.5-thresholded sigmoids):

    - micro-F1 of a group: TP, FP and FN pooled over all labels and the group's examples, 2TP / (2TP+FP+FN);
    - macro-F1 of a group: the mean over **all** labels of each label's F1 in the group; a label neither present
      nor predicted in the group scores 0 (``zero_division=0``), as in FairLex;
    - group disparity ``gd_<metric>``: the population standard deviation (``np.std``) of the per-group scores
      over the non-empty groups (FairLex's report, statistics/report_avg_scores.py; it also dropped groups
      scoring exactly 0, which we keep: a 0 is a score, an empty group has none);
    - ``*_wg``: the lowest per-group score over the non-empty groups (worst group, by macro-F1 for
      ``worst_group``); ``*_avg``: over all examples pooled.

    Predictions and targets arrive as label-set bitmasks (``preds``, ``target``: (B,)); state is per group x
    label counts, summed across DDP processes."""

    full_state_update = False

    def __init__(self, group_names: list[str], num_labels: int, **kwargs):
        super().__init__(**kwargs)
        self.group_names, self.num_labels = list(group_names), int(num_labels)
        g, c = len(self.group_names), self.num_labels
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(g, c, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"all_{name}", default=torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(g, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("all_total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> None:
        """preds, target: (B,) bitmasks; masks: (B, G) boolean group membership."""
        p, t = bits(preds, self.num_labels), bits(target, self.num_labels)
        tp, fp, fn = p & t, p & (1 - t), (1 - p) & t
        m = masks.long()
        for name, v in (("tp", tp), ("fp", fp), ("fn", fn)):
            getattr(self, name).add_((m.unsqueeze(2) * v.unsqueeze(1)).sum(0))  # (G, C); no integer matmul on CUDA
            getattr(self, f"all_{name}").add_(v.sum(0))
        self.total += m.sum(0)
        self.all_total += p.shape[0]

    def compute(self) -> dict:
        tp, fp, fn = self.tp.cpu(), self.fp.cpu(), self.fn.cpu()
        total = self.total.cpu().tolist()
        micro = _f1(tp.sum(1), fp.sum(1), fn.sum(1)).tolist()
        macro = _f1(tp, fp, fn).mean(1).tolist() if self.num_labels else [math.nan] * len(total)
        present = [i for i, n in enumerate(total) if n]

        def by_group(values):
            return {n: (v if t else math.nan) for n, v, t in zip(self.group_names, values, total)}

        def spread(values):
            return float(np.std([values[i] for i in present])) if present else math.nan

        n_all = int(self.all_total)
        atp, afp, afn = self.all_tp.cpu(), self.all_fp.cpu(), self.all_fn.cpu()
        worst = min(present, key=lambda i: macro[i]) if present else None
        return {
            "task": MULTILABEL,
            "micro_f1_avg": float(_f1(atp.sum(), afp.sum(), afn.sum())) if n_all else math.nan,
            "macro_f1_avg": float(_f1(atp, afp, afn).mean()) if n_all else math.nan,
            "micro_f1_wg": min(micro[i] for i in present) if present else math.nan,
            "macro_f1_wg": macro[worst] if worst is not None else math.nan,
            "gd_micro_f1": spread(micro),
            "gd_macro_f1": spread(macro),
            "worst_group": self.group_names[worst] if worst is not None else None,
            "micro_f1": by_group(micro),
            "macro_f1": by_group(macro),
            "count": dict(zip(self.group_names, total)),
            "n": n_all,
            "empty": [n for n, t in zip(self.group_names, total) if not t],
        }


def is_multilabel_result(result: dict) -> bool:
    return isinstance(result, dict) and result.get("task") == MULTILABEL


def flatten_multilabel(split: str, grouping: str | None, result: dict) -> dict[str, float]:
    """``test/micro_f1_avg``, ``test/macro_f1_avg`` (primary only: they do not depend on the grouping), and per
    grouping ``<pre>micro_f1_wg``, ``<pre>macro_f1_wg``, ``<pre>gd_micro_f1``, ``<pre>gd_macro_f1``,
    ``<pre>micro_f1/<group>``, ``<pre>macro_f1/<group>`` and ``<pre>count/<group>`` (absent groups: count only)."""
    pre = f"{split}/" if grouping is None else f"{split}/{grouping}/"
    out: dict[str, float] = {}
    if grouping is None:
        out[f"{pre}micro_f1_avg"] = result["micro_f1_avg"]
        out[f"{pre}macro_f1_avg"] = result["macro_f1_avg"]
    for key in ("micro_f1_wg", "macro_f1_wg", "gd_micro_f1", "gd_macro_f1"):
        out[f"{pre}{key}"] = result[key]
    for metric in ("micro_f1", "macro_f1"):
        for name, v in result[metric].items():
            if not math.isnan(v):
                out[f"{pre}{metric}/{name}"] = v
    for name, c in result["count"].items():
        out[f"{pre}count/{name}"] = float(c)
    return out


def group_metric(group_names: list[str], multilabel: bool = False, num_labels: int = 0,
                 row_average: bool = False) -> Metric:
    """The metric of one grouping: accuracy, or per-group F1 for a multi-label dataset."""
    return GroupMultiLabelF1(group_names, num_labels) if multilabel else GroupAccuracy(group_names, row_average)
