"""Structured removal that shrinks the fine-tuned model, then re-fine-tuning with the same settings.

- ``FFNPruning`` (ffn25, ffn50): every layer loses the ``sparsity`` share of its intermediate FFN neurons
  (rows of ``intermediate.dense``, columns of ``output.dense``: physically smaller matrices). A neuron's
  importance, compared within its layer:
  - ``weight`` (default, data-free): ``||W_in[j, :]||_2 * ||W_out[:, j]||_2``, the product of the norms
    of the weights that feed and read neuron j: the structured analogue of magnitude pruning (the norm
    criterion of Li et al. 2017, "Pruning Filters for Efficient ConvNets", applied to the pair of
    matrices a neuron spans);
  - ``activation`` (calibration data): ``||A_j||_2 * ||W_out[:, j]||_2`` with ``A_j`` neuron j's
    activations over the calibration tokens (padding excluded). This is exactly the Frobenius norm of the
    neuron's contribution ``A_j W_out[:, j]^T`` to the FFN output, i.e. Wanda's ``|W| ||X||`` summed over
    the structure (the "Wanda-sp" variant of An et al. 2024, "Fluctuation-based Adaptive Structured
    Pruning for LLMs"). Drawn with ``calibration: {source, examples, seed}`` (``data.calibration``).
  The kept neurons' original indices are recorded in ``config.sr_ffn_kept`` (one list per layer), and
  ``models.surgery.load_pruned`` rebuilds that shape before loading the weights.
- ``LayerDropping`` (drop2, drop3): remove whole transformer layers, the top ones by default (Sajjad et
  al. 2023, "On the Effect of Dropping Layers of Pre-trained Transformer Models", a.k.a. "Poor Man's
  BERT": top-layer dropping is their best strategy without re-training from scratch); ``which=bottom``
  or ``alternate`` (every second layer counting down from the top). ``config.num_hidden_layers`` becomes
  the new count, so ``from_pretrained`` (and ``load_pruned``) rebuild it; per-layer shape records of
  earlier stages (kept heads, kept FFN neurons) lose the dropped layers' entries, and the original
  indices of the layers kept are recorded in ``config.sr_kept_layers`` (informational).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.figures import count_parameters
from subgroup_robustness.models.structure import feed_forward_blocks, layer_stack
from subgroup_robustness.models.surgery import FFN_KEPT_KEY, KEPT_HEADS_KEY, prune_ffn
from subgroup_robustness.utils.errors import ConfigError

KEPT_LAYERS_KEY = "sr_kept_layers"  # informational: original indices of the layers kept after dropping
PER_LAYER_KEYS = (KEPT_HEADS_KEY, FFN_KEPT_KEY)
IMPORTANCES = ("weight", "activation")
WHICH = ("top", "bottom", "alternate")


# ---- FFN neurons -----------------------------------------------------------------------------------
def ffn_sizes(model: nn.Module) -> list[int]:
    return [int(inter.dense.out_features) for inter, _, _, _ in feed_forward_blocks(model)]


def ffn_weight_importance(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, ``||W_in[j, :]|| * ||W_out[:, j]||`` of every intermediate neuron j."""
    out = []
    for inter, _, output, _ in feed_forward_blocks(model):
        w_in, w_out = inter.dense.weight.detach().float(), output.dense.weight.detach().float()
        out.append((w_in.norm(dim=1) * w_out.norm(dim=0)).cpu())
    return out


def ffn_activation_importance(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per layer, ``||A_j||_2 * ||W_out[:, j]||`` with ``A_j`` neuron j's activations over the calibration
    tokens (the input of ``output.dense``), padding excluded."""
    from subgroup_robustness.compression.sparsity import observe_inputs

    blocks = feed_forward_blocks(model)
    modules = [(str(i), output.dense) for i, (_, _, output, _) in enumerate(blocks)]
    sums: dict[str, torch.Tensor] = {}

    def observe(key, rows):
        v = rows.float().pow(2).sum(0)
        sums[key] = sums[key] + v if key in sums else v

    observe_inputs(model, batches, modules, observe)
    out = []
    for i, (_, _, output, _) in enumerate(blocks):
        a = sums.get(str(i))
        if a is None:
            raise ConfigError("ffn pruning: the calibration pass never reached the FFN (no calibration examples?)")
        out.append((a.sqrt() * output.dense.weight.detach().float().norm(dim=0)).cpu())
    return out


def select_neurons(scores: Sequence[torch.Tensor], sparsity: float) -> list[list[int]]:
    """Per layer, the positions of the neurons kept: ``int(sparsity * size)`` lowest-scored go (>= 1 kept)."""
    keep = []
    for s in scores:
        n = len(s)
        drop = min(int(n * sparsity), n - 1)
        order = torch.argsort(s.float(), descending=True, stable=True)
        keep.append(sorted(order[: n - drop].tolist()))
    return keep




# ---- layers ------------------------------------------------------------------------------------------
def layers_to_drop(n_layers: int, count: int, which: str = "top") -> list[int]:
    """Positions of the layers removed: the ``count`` top ones, the bottom ones, or every second one
    counting down from the top (``alternate``: 11, 9, 7, ... of 12)."""
    if which not in WHICH:
        raise ConfigError(f"layer dropping: which={which!r}; use one of {list(WHICH)}")
    if not 0 <= count < n_layers:
        raise ConfigError(f"layer dropping: cannot drop {count} of {n_layers} layers (at least one must stay)")
    if which == "top":
        return list(range(n_layers - count, n_layers))
    if which == "bottom":
        return list(range(count))
    drop = [n_layers - 1 - 2 * i for i in range(count)]
    if drop and drop[-1] < 0:
        raise ConfigError(f"layer dropping: which=alternate drops every second layer, at most "
                          f"{(n_layers + 1) // 2} of {n_layers}; asked for {count}")
    return sorted(drop)


def drop_layers(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove the layers at positions ``drop`` in place; returns the original indices of those kept."""
    parent, attr, layers = layer_stack(model)
    n = len(layers)
    drop_set = {int(d) for d in drop}
    if not drop_set <= set(range(n)) or len(drop_set) >= n:
        raise ConfigError(f"layer dropping: positions {sorted(drop_set)} for a model with {n} layers (one must stay)")
    kept_pos = [i for i in range(n) if i not in drop_set]
    config = model.config
    before = getattr(config, KEPT_LAYERS_KEY, None) or list(range(n))
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept_pos]))
    config.num_hidden_layers = len(kept_pos)
    for key in PER_LAYER_KEYS:  # per-layer shape records follow the layers
        rec = getattr(config, key, None)
        if rec:
            setattr(config, key, [rec[i] for i in kept_pos])
    kept = [int(before[i]) for i in kept_pos]
    setattr(config, KEPT_LAYERS_KEY, kept)
    return kept


# ---- compressors ---------------------------------------------------------------------------------------
class _Structured(Compressor):
    family = "pruning"
    stage = "after"
    start_from = "finetuned"
    trains = True
    quantizes = False


class FFNPruning(_Structured):
    """Remove the least important share of every layer's FFN neurons, then re-fine-tune."""

    name = "ffn_pruning"

    def __init__(self, sparsity: float, importance: str = "weight", calibration: Mapping[str, Any] | None = None):
        try:
            value = float(sparsity)
        except (TypeError, ValueError):
            raise ConfigError(f"ffn pruning: sparsity={sparsity!r} is not a number; e.g. 0.25 removes a quarter "
                              "of every layer's FFN neurons") from None
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"ffn pruning: sparsity={sparsity} must be in [0, 1)")
        if importance not in IMPORTANCES:
            raise ConfigError(f"ffn pruning: importance={importance!r}; use one of {list(IMPORTANCES)}")
        from subgroup_robustness.data.calibration import check_calibration

        self.sparsity = value
        self.importance = importance
        self.calibration = check_calibration(calibration, "ffn pruning") if importance == "activation" else None
        self._before: list[int] = []
        self._params_before = 0
        self._extra: dict[str, Any] = {}

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = ctx.model
        self._before = ffn_sizes(model)
        self._params_before = count_parameters(model)
        t0 = time.perf_counter()
        if self.importance == "activation":
            from subgroup_robustness.data.calibration import calibration_from_spec

            batches, record = calibration_from_spec(ctx.data, self.calibration, int(ctx.seed))
            self._extra["calibration"] = record
            scores = ffn_activation_importance(model, batches)
        else:
            scores = ffn_weight_importance(model)
        prune_ffn(model, select_neurons(scores, self.sparsity))
        self._extra["selection_s"] = time.perf_counter() - t0
        return Compressed(model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        after = ffn_sizes(ctx.model)
        total = sum(self._before)
        return {
            "criterion": ("||W_in row|| * ||W_out column|| per neuron, within each layer"
                          if self.importance == "weight" else
                          "||activations|| * ||W_out column|| per neuron over calibration tokens, within each layer"),
            "ffn_before": self._before,
            "ffn_kept": after,
            "ffn_sparsity": (total - sum(after)) / total if total else 0.0,
            "params_removed": self._params_before - count_parameters(ctx.model),
            **self._extra,
        }


class LayerDropping(_Structured):
    """Remove whole transformer layers (top ones by default), then re-fine-tune."""

    name = "layer_dropping"

    def __init__(self, num_layers: int, which: str = "top"):
        try:
            self.num_layers = int(num_layers)
        except (TypeError, ValueError):
            raise ConfigError(f"layer dropping: num_layers={num_layers!r} is not a whole number") from None
        if self.num_layers < 0:
            raise ConfigError(f"layer dropping: num_layers={num_layers} must be >= 0")
        if which not in WHICH:
            raise ConfigError(f"layer dropping: which={which!r}; use one of {list(WHICH)}")
        self.which = which
        self._info: dict[str, Any] = {}

    def apply(self, ctx: CompressionContext) -> Compressed:
        model = ctx.model
        n = len(layer_stack(model)[2])
        params = count_parameters(model)
        drop = layers_to_drop(n, self.num_layers, self.which)
        before = list(getattr(model.config, KEPT_LAYERS_KEY, None) or range(n))
        kept = drop_layers(model, drop)
        self._info = {"layers_before": n, "layers_kept": len(kept), "kept_layer_indices": kept,
                      "dropped_layer_indices": [int(before[i]) for i in drop],
                      "params_removed": params - count_parameters(model)}
        return Compressed(model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        return {"criterion": f"drop the {self.which} layers (Sajjad et al. 2023)", **self._info}
