"""Pruning of the fine-tuned model, then re-fine-tuning with the same training settings.

- ``HeadPruning`` (the paper's PR20-PR80) reproduces what the authors ran, NNI 2.10's
  ``TransformerHeadPruner(ranking_criterion='l1_weight', global_sort=True, num_iterations=1)``: a head's
  score is the mean over query/key/value of the L1 norm of its weight rows; all heads of all layers are
  ranked together and the ``int(sparsity * total)`` lowest are removed. Like NNI, a layer always keeps
  its last head: when the next-lowest head is a layer's last one it is skipped and the following head
  is removed instead, so the total is still met. (transformers 5 cannot run a layer without heads, and
  an attention block reduced to its output bias is not what the paper measured.) Heads are removed
  physically (smaller Q/K/V and output matrices: fewer parameters, a smaller file). The kept heads are
  recorded in ``config.sr_kept_heads``; ``load_pruned`` rebuilds that shape before loading the weights,
  since ``from_pretrained`` alone cannot.
- ``MagnitudePruning`` (UP20-UP80, in the authors' code but not in Table 1): global L1 unstructured
  pruning of every Linear weight with ``torch.nn.utils.prune``. The masks stay on during re-fine-tuning,
  so pruned weights stay zero, and are made permanent afterwards. Zeros are still stored densely: the
  parameter count and the file size do not change, only the sparsity does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from subgroup_robustness.compression.base import Compressor, count_parameters
from subgroup_robustness.compression.quantization import cpu_latency_ms
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.experiment import RunContext

KEPT_HEADS_KEY = "sr_kept_heads"  # in the model config: original indices of the heads each layer kept
PROJECTIONS = ("query", "key", "value")


# ---- head pruning --------------------------------------------------------------------------------------
def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The self-attention blocks, in layer order: BERT-style modules with ``self.{query,key,value}`` and
    ``output.dense`` (BERT, MiniLM, TinyBERT, RoBERTa, ELECTRA)."""
    blocks = []
    for module in model.modules():
        sa = module._modules.get("self")
        out = getattr(module._modules.get("output"), "dense", None)
        if (sa is not None and isinstance(out, nn.Linear) and hasattr(sa, "attention_head_size")
                and all(isinstance(getattr(sa, p, None), nn.Linear) for p in PROJECTIONS)):
            blocks.append(module)
    if not blocks:
        raise ConfigError(
            f"head pruning needs BERT-style attention (self.query/key/value + output.dense); "
            f"{type(model).__name__} has none. Use a BERT-family model (e.g. model=minilm_l6, bert_base)."
        )
    return blocks


def head_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, each head's mean L1 norm over its query, key and value weight rows (NNI's l1_weight)."""
    scores = []
    for block in attention_blocks(model):
        sa = block.self
        n = int(sa.num_attention_heads)
        per = [getattr(sa, p).weight.detach().float().abs().reshape(n, -1).sum(-1) for p in PROJECTIONS]
        scores.append((sum(per) / 3).cpu())
    return scores


def select_heads(scores: Sequence[torch.Tensor], sparsity: float) -> list[list[int]]:
    """Heads to keep per layer: the ``int(sparsity * total)`` lowest-scored heads go, ranked globally,
    while every layer keeps at least one head."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"head pruning: sparsity={sparsity} must be in [0, 1), e.g. 0.4 removes 40% of the heads")
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


def _prune_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    from transformers.pytorch_utils import prune_linear_layer

    return prune_linear_layer(layer, index, dim=dim).to(dtype=layer.weight.dtype)


def prune_heads(model: nn.Module, keep: Sequence[Sequence[int]]) -> None:
    """Keep only the heads ``keep[layer]`` (positions among the layer's current heads), in place, and
    record them in ``config.sr_kept_heads`` as indices of the original heads."""
    blocks = attention_blocks(model)
    if len(keep) != len(blocks):
        raise ConfigError(f"head pruning: {len(keep)} layers of kept heads for a model with {len(blocks)} layers")
    config = getattr(model, "config", None)
    before = getattr(config, KEPT_HEADS_KEY, None) or [list(range(b.self.num_attention_heads)) for b in blocks]
    record = []
    for layer, (block, heads) in enumerate(zip(blocks, keep)):
        sa = block.self
        n, d = int(sa.num_attention_heads), int(sa.attention_head_size)
        heads = sorted({int(h) for h in heads})
        if not heads or heads[0] < 0 or heads[-1] >= n:
            raise ConfigError(f"head pruning: layer {layer} must keep 1..{n} of its heads 0..{n - 1}, got {heads}")
        record.append([int(before[layer][h]) for h in heads])
        if len(heads) == n:
            continue
        index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        for p in PROJECTIONS:
            setattr(sa, p, _prune_linear(getattr(sa, p), index, 0))
        block.output.dense = _prune_linear(block.output.dense, index, 1)
        # transformers 5 reshapes with view(..., -1, head_size): the head count only has to agree
        sa.num_attention_heads = len(heads)
        sa.all_head_size = len(heads) * d
    if config is not None:
        setattr(config, KEPT_HEADS_KEY, record)


def kept_heads(model: nn.Module) -> list[list[int]] | None:
    return getattr(getattr(model, "config", None), KEPT_HEADS_KEY, None)


@contextlib.contextmanager
def _quiet_transformers():
    """Loading our own checkpoint: transformers' load report and tensor-parallel notes are not news."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pruned(folder: str | Path):
    """A sequence classifier saved with ``save_pretrained``, head-pruned or not: a pruned one is rebuilt
    in its pruned shape, then its safetensors weights are loaded (strictly: every key must match)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    keep = getattr(config, KEPT_HEADS_KEY, None)
    if not keep:
        with _quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                      trust_remote_code=False)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    setattr(model.config, KEPT_HEADS_KEY, None)
    prune_heads(model, keep)  # a fresh model has every original head, so original indices are positions
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).exists():
            raise CorruptDataError(f"{folder}: {name} is missing; re-save the pruned model with save_pretrained")
        state.update(load_file(folder / name))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptDataError(
            f"{folder}: the weights do not fit the pruned shape recorded in config.json ({KEPT_HEADS_KEY}): "
            f"{str(exc).splitlines()[0]}. Re-save the model after pruning."
        ) from None
    return model.eval()


class HeadPruning(Compressor):
    """Remove the globally lowest-L1 attention heads of the fine-tuned model, then re-fine-tune."""

    name = "head_pruning"
    family = "pruning"
    stage = "after"
    start_from = "finetuned"
    trains = True

    def __init__(self, sparsity: float, latency_batches: int = 4):
        self.sparsity = float(sparsity)
        self.latency_batches = int(latency_batches)
        self._heads_before: list[int] = []
        self._params_before = 0
        self._latency_before: float | None = None

    def apply(self, ctx: "RunContext") -> None:
        model = ctx.model
        keep = select_heads(head_scores(model), self.sparsity)
        self._heads_before = [int(b.self.num_attention_heads) for b in attention_blocks(model)]
        self._params_before = count_parameters(model)
        self._latency_before = cpu_latency_ms(model, ctx.datamodule, self.latency_batches)
        prune_heads(model, keep)

    def report(self, ctx: "RunContext") -> dict[str, Any]:
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
            "cpu_latency_ms_per_example": {"before": self._latency_before,
                                           "after": cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)},
        }


# ---- unstructured magnitude pruning ------------------------------------------------------------------
def linear_targets(model: nn.Module, scope: str = "all") -> list[tuple[nn.Module, str]]:
    """(module, 'weight') of every Linear: of the whole model (``all``, the authors' code) or only of the
    transformer layers (``encoder``: no pooler, no classifier)."""
    if scope not in ("all", "encoder"):
        raise ConfigError(f"magnitude pruning: scope={scope!r}; use 'all' (every Linear) or 'encoder'")
    root = model
    if scope == "encoder":
        root = getattr(getattr(model, "base_model", model), "encoder", None)
        if root is None:
            raise ConfigError(f"magnitude pruning: {type(model).__name__} has no .encoder; use scope=all")
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

    def __init__(self, sparsity: float, scope: str = "all", latency_batches: int = 4):
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"magnitude pruning: sparsity={sparsity} must be in [0, 1)")
        self.sparsity = float(sparsity)
        self.scope = scope
        self.latency_batches = int(latency_batches)
        self._latency_before: float | None = None

    def apply(self, ctx: "RunContext") -> None:
        targets = linear_targets(ctx.model, self.scope)
        self._latency_before = cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=self.sparsity)

    def finalize(self, ctx: "RunContext") -> None:
        """Bake the masks into the weights (weight_orig * mask -> weight): a plain model again."""
        for module in ctx.model.modules():
            if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
                prune.remove(module, "weight")

    def report(self, ctx: "RunContext") -> dict[str, Any]:
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
            "cpu_latency_ms_per_example": {"before": self._latency_before,
                                           "after": cpu_latency_ms(ctx.model, ctx.datamodule, self.latency_batches)},
        }
