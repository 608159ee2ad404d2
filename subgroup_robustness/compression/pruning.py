"""Pruning of the fine-tuned model, then re-fine-tuning with the same training settings.

- ``HeadPruning`` (the paper's PR20-PR80) reproduces what the authors ran, NNI 2.10's
  ``TransformerHeadPruner(ranking_criterion='l1_weight', global_sort=True, num_iterations=1)``: a head's
  score is the mean over query/key/value of the L1 norm of its weight rows; all heads of all layers are
  ranked together and the ``int(sparsity * total)`` lowest are removed. Like NNI, a layer always keeps
  its last head: when the next-lowest head is a layer's last one it is skipped and the following head
  is removed instead, so the total is still met. (transformers 5 cannot run a layer without heads, and
  an attention block reduced to its output bias is not what the paper measured.) Heads are removed
  physically (smaller Q/K/V and output matrices: fewer parameters, a smaller file). The kept heads are
  recorded in ``config.sr_kept_heads``; ``models.surgery.load_pruned`` rebuilds that shape before loading
  the weights, since ``from_pretrained`` alone cannot.
- ``MagnitudePruning`` (UP20-UP80, in the authors' code but not in Table 1): global L1 unstructured
  pruning of every Linear weight with ``torch.nn.utils.prune``. The masks stay on during re-fine-tuning,
  so pruned weights stay zero, and are made permanent afterwards. Zeros are still stored densely: the
  parameter count and the file size do not change, only the sparsity does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.figures import count_parameters
from subgroup_robustness.models.structure import PROJECTIONS, attention_blocks, encoder
from subgroup_robustness.models.surgery import kept_heads, prune_heads
from subgroup_robustness.utils.errors import ConfigError


SCOPES = ("all", "encoder")


# ---- head pruning --------------------------------------------------------------------------------------
def head_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, each head's mean L1 norm over its query, key and value weight rows (NNI's l1_weight)."""
    scores = []
    for block in attention_blocks(model):
        sa = block.self
        n = int(sa.num_attention_heads)
        per = [getattr(sa, p).weight.detach().float().abs().reshape(n, -1).sum(-1) for p in PROJECTIONS]
        scores.append((sum(per) / 3).cpu())
    return scores


def check_sparsity(sparsity: Any, what: str, example: str) -> float:
    """A sparsity in [0, 1), or one ConfigError line saying what it means (checked when the chain is built)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: sparsity={sparsity!r} is not a number; give a fraction in [0, 1), {example}") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{what}: sparsity={sparsity} must be in [0, 1), {example}")
    return value


def select_heads(scores: Sequence[torch.Tensor], sparsity: float) -> list[list[int]]:
    """Heads to keep per layer: the ``int(sparsity * total)`` lowest-scored heads go, ranked globally,
    while every layer keeps at least one head."""
    check_sparsity(sparsity, "head pruning", "e.g. 0.4 removes 40% of the heads")
    sizes = [len(s) for s in scores]
    total = sum(sizes)
    n_prune = int(total * float(sparsity))
    if n_prune > total - len(sizes):
        raise ConfigError(
            f"head pruning: sparsity={sparsity} asks to remove {n_prune} of {total} heads, but every layer keeps "
            f"at least one head, so at most {total - len(sizes)} can go "
            f"(sparsity <= {(total - len(sizes)) / total:.3f})"
        )
    ranked = sorted((float(v), layer, head) for layer, s in enumerate(scores) for head, v in enumerate(s.tolist()))
    removed: list[set[int]] = [set() for _ in sizes]
    count = 0
    for _, layer, head in ranked:
        if count >= n_prune:
            break
        if sizes[layer] - len(removed[layer]) > 1:
            removed[layer].add(head)
            count += 1
    return [[h for h in range(n) if h not in removed[layer]] for layer, n in enumerate(sizes)]


class HeadPruning(Compressor):
    """Remove the globally lowest-L1 attention heads of the fine-tuned model, then re-fine-tune."""

    name = "head_pruning"
    family = "pruning"
    stage = "after"
    start_from = "finetuned"
    trains = True

    def __init__(self, sparsity: float):
        self.sparsity = check_sparsity(sparsity, "head pruning", "e.g. 0.4 removes 40% of the heads")
        self._heads_before: list[int] = []
        self._params_before = 0

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = ctx.model
        keep = select_heads(head_scores(model), self.sparsity)
        self._heads_before = [int(b.self.num_attention_heads) for b in attention_blocks(model)]
        self._params_before = count_parameters(model)
        prune_heads(model, keep)
        return Compressed(model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        heads = [int(b.self.num_attention_heads) for b in attention_blocks(ctx.model)]
        total = sum(self._heads_before)
        return {
            "criterion": "l1_weight (mean L1 of query/key/value head rows), global ranking, >= 1 head per layer",
            "heads_before": self._heads_before,
            "heads_kept": heads,
            "kept_head_indices": kept_heads(ctx.model),
            "heads_removed": total - sum(heads),
            "head_sparsity": (total - sum(heads)) / total if total else 0.0,
            "params_removed": self._params_before - count_parameters(ctx.model),
        }


# ---- unstructured magnitude pruning ------------------------------------------------------------------
def linear_targets(model: nn.Module, scope: str = "all") -> list[tuple[nn.Module, str]]:
    """(module, 'weight') of every Linear: of the whole model (``all``, the authors' code) or only of the
    transformer layers (``encoder``: no pooler, no classifier)."""
    if scope not in SCOPES:
        raise ConfigError(f"magnitude pruning: scope={scope!r}; use 'all' (every Linear) or 'encoder'")
    root = encoder(model) if scope == "encoder" else model
    return [(m, "weight") for m in root.modules() if isinstance(m, nn.Linear)]


def weight_sparsity(targets: Sequence[tuple[nn.Module, str]]) -> float:
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    total = sum(getattr(m, n).numel() for m, n in targets)
    return zeros / total if total else 0.0


class MagnitudePruning(Compressor):
    """Zero the globally smallest-magnitude Linear weights of the fine-tuned model, then re-fine-tune with
    the masks on, so they stay zero."""

    name = "magnitude_pruning"
    family = "pruning"
    stage = "after"
    start_from = "finetuned"
    trains = True

    def __init__(self, sparsity: float, scope: str = "all"):
        self.sparsity = check_sparsity(sparsity, "magnitude pruning", "e.g. 0.4 zeroes 40% of the Linear weights")
        if scope not in SCOPES:
            raise ConfigError(f"magnitude pruning: scope={scope!r}; use 'all' (every Linear) or 'encoder'")
        self.scope = scope

    def apply(self, ctx: CompressionContext) -> Compressed:
        prune.global_unstructured(linear_targets(ctx.model, self.scope), pruning_method=prune.L1Unstructured,
                                  amount=self.sparsity)
        return Compressed(ctx.model)

    def finalize(self, ctx: CompressionContext) -> None:
        """Bake the masks into the weights (weight_orig * mask -> weight): a plain model again."""
        for module in ctx.model.modules():
            if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
                prune.remove(module, "weight")

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        targets = linear_targets(ctx.model, self.scope)
        total_params = count_parameters(ctx.model)
        zeros = sum(int((p == 0).sum()) for p in ctx.model.parameters())
        return {
            "criterion": "global L1 (torch.nn.utils.prune.L1Unstructured)",
            "pruned_weights": sum(getattr(m, n).numel() for m, n in targets),
            "sparsity_target": self.sparsity,
            "sparsity": weight_sparsity(targets),
            "model_sparsity": zeros / total_params if total_params else 0.0,
            "nonzero_params": total_params - zeros,
        }
