"""Models whose shape differs from their config's defaults: how such a checkpoint is written and read.

``from_pretrained`` builds every layer at the config's nominal sizes, so a model with removed heads (or any
other structural change) cannot be loaded by it alone. A structural change records itself in the model
config under its own key (``sr_kept_heads`` for head pruning); ``load_pruned`` builds the nominal model,
replays every recorded change, then loads the safetensors weights strictly. A new structural compressor
registers its key and its replay function with :func:`register_shape` — the model layer never needs to
import a compressor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from subgroup_robustness.models.structure import PROJECTIONS, attention_blocks, feed_forward_blocks
from subgroup_robustness.utils.env import quiet_transformers
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError

KEPT_HEADS_KEY = "sr_kept_heads"  # in the model config: original indices of the heads each layer kept
FFN_KEPT_KEY = "sr_ffn_kept"      # in the model config: original indices of the FFN neurons each layer kept

# config key -> function(model, recorded value) that rebuilds that shape on a freshly built model
_SHAPES: dict[str, Callable[[nn.Module, Any], None]] = {}


def register_shape(key: str, rebuild: Callable[[nn.Module, Any], None]) -> None:
    """Make ``load_pruned`` replay a structural change recorded under ``config.<key>``; ``rebuild`` must
    leave ``config.<key>`` set to the recorded value."""
    _SHAPES[key] = rebuild


def shape_records(config) -> dict[str, Any]:
    return {k: getattr(config, k) for k in _SHAPES if getattr(config, k, None)}


def prune_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear keeping only ``index`` rows (dim 0) or columns (dim 1), in its dtype and device."""
    from transformers.pytorch_utils import prune_linear_layer

    return prune_linear_layer(layer, index.to(layer.weight.device), dim=dim).to(dtype=layer.weight.dtype)


# ---- attention heads ----------------------------------------------------------------------------------
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
            setattr(sa, p, prune_linear(getattr(sa, p), index, 0))
        block.output.dense = prune_linear(block.output.dense, index, 1)
        # transformers 5 reshapes with view(..., -1, head_size): the head count only has to agree
        sa.num_attention_heads = len(heads)
        sa.all_head_size = len(heads) * d
    if config is not None:
        setattr(config, KEPT_HEADS_KEY, record)


def kept_heads(model: nn.Module) -> list[list[int]] | None:
    return getattr(getattr(model, "config", None), KEPT_HEADS_KEY, None)


register_shape(KEPT_HEADS_KEY, prune_heads)  # a fresh model has every original head: indices are positions


# ---- FFN neurons --------------------------------------------------------------------------------------
def prune_ffn(model: nn.Module, keep: Sequence[Sequence[int]]) -> None:
    """Keep only the intermediate neurons ``keep[layer]`` (positions among the layer's current neurons), in
    place, and record them in ``config.sr_ffn_kept`` as indices of the original neurons."""
    blocks = feed_forward_blocks(model)
    if len(keep) != len(blocks):
        raise ConfigError(f"ffn pruning: {len(keep)} layers of kept neurons for a model with {len(blocks)} layers")
    config = getattr(model, "config", None)
    before = getattr(config, FFN_KEPT_KEY, None) or [list(range(inter.dense.out_features)) for inter, _, _, _ in blocks]
    record = []
    for layer, ((inter, _, output, _), kept) in enumerate(zip(blocks, keep)):
        n = int(inter.dense.out_features)
        kept = sorted({int(k) for k in kept})
        if not kept or kept[0] < 0 or kept[-1] >= n:
            raise ConfigError(f"ffn pruning: layer {layer} must keep 1..{n} of its neurons 0..{n - 1}")
        record.append([int(before[layer][k]) for k in kept])
        if len(kept) == n:
            continue
        index = torch.as_tensor(kept, dtype=torch.long)
        inter.dense = prune_linear(inter.dense, index, 0)
        output.dense = prune_linear(output.dense, index, 1)
    if config is not None:
        setattr(config, FFN_KEPT_KEY, record)


register_shape(FFN_KEPT_KEY, prune_ffn)  # a fresh model has every original neuron: indices are positions


# ---- reading ------------------------------------------------------------------------------------------
def is_reshaped(folder: str | Path) -> bool:
    """Whether a saved model's config.json records a structural change."""
    with open(Path(folder) / "config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    return any(cfg.get(k) for k in _SHAPES)


def load_pruned(folder: str | Path):
    """A sequence classifier saved with ``save_pretrained``, reshaped or not: a reshaped one is rebuilt in
    its recorded shape, then its safetensors weights are loaded (strictly: every key must match)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    records = shape_records(config)
    if not records:
        with quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                      trust_remote_code=False)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    for key, value in records.items():
        setattr(model.config, key, None)
        _SHAPES[key](model, value)
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
            f"{folder}: the weights do not fit the shape recorded in config.json ({', '.join(records)}): "
            f"{str(exc).splitlines()[0]}. Re-save the model after pruning."
        ) from None
    return model.eval()
