"""Calibration data as a factor: which training examples a one-shot compressor (static int8, Wanda,
SparseGPT) is shown.

``calibration_batches(dm, source, examples, seed)`` draws ``examples`` examples from the TRAINING split
only (``dm.splits["train"]``), seeded, and returns them as padded batches built by the data module's own
``Collator`` (the batches the model sees in training, without labels ever being used), together with a
record of what was drawn for results.json.

Sources (groups = the dataset's primary grouping, ``dm.primary``):

- ``natural``: a uniform sample without replacement: groups appear as often as in the training split.
- ``group_balanced``: the same number of examples from every group. When a group has fewer training
  examples than its share, all of it is taken and the shortfall is spread evenly over the groups that
  still have examples (max-min fair, "water-filling"): the total stays ``examples`` whenever the training
  split has that many grouped examples, and no group gets more than any group that could still give
  more. When ``examples`` is not a multiple of the number of groups, the remainder goes to groups drawn
  at random (seeded). Examples in no group are never drawn. For overlapping groupings (an example in
  several groups, e.g. CivilComments' identities) each group's share is drawn from its not-yet-drawn
  members, and the recorded per-group counts count an example once for every group it belongs to.
- ``worst_group``: only the smallest primary group of the training split (fewest training examples among
  the non-empty groups; ties go to the first in ``dm.primary.group_names``). This is a data definition,
  fixed before any model is trained: it is the group a compressor sees least of under ``natural``
  sampling. When it has fewer than ``examples`` members all of them are used (never repeated) and the
  record says so.

The record: ``{source, examples_requested, examples, seed, group_counts: {group: n}, group_sizes_train:
{group: n}}`` (+ ``group`` for ``worst_group``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from subgroup_robustness.utils.errors import ConfigError

SOURCES = ("natural", "group_balanced", "worst_group")
DEFAULTS = {"source": "natural", "examples": 256, "seed": 0}


def check_calibration(calibration: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A calibration spec with its defaults filled, or one ConfigError line (called in ``__init__``, before
    any training). A Hydra DictConfig is taken as the plain dict it resolves to (settings go into
    results.json)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(calibration, DictConfig):
        calibration = OmegaConf.to_container(calibration, resolve=True)
    spec = dict(DEFAULTS)
    if calibration is not None:
        if not isinstance(calibration, Mapping):
            raise ConfigError(f"{what}: calibration={calibration!r} must be a mapping "
                              "{source: natural|group_balanced|worst_group, examples: N, seed: S}")
        unknown = set(calibration) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"{what}: calibration has unknown keys {sorted(unknown)}; use {sorted(DEFAULTS)}")
        spec.update({k: v for k, v in calibration.items() if v is not None or k == "seed"})
    if spec["source"] not in SOURCES:
        raise ConfigError(f"{what}: calibration.source={spec['source']!r}; use one of {list(SOURCES)}")
    try:
        spec["examples"] = int(spec["examples"])
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: calibration.examples={spec['examples']!r} is not a number") from None
    if spec["examples"] < 1:
        raise ConfigError(f"{what}: calibration.examples={spec['examples']} must be >= 1")
    if spec["seed"] is not None:
        try:
            spec["seed"] = int(spec["seed"])
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: calibration.seed={spec['seed']!r} is not an integer") from None
    return spec


def _fair_quota(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Max-min fair allocation of ``total`` over groups of ``sizes`` (water-filling); the remainder of an
    uneven split goes to groups drawn at random among those with room left."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    left = min(int(total), int(sizes.sum()))
    while left > 0:
        open_ = np.flatnonzero(quota < sizes)
        share = left // len(open_)
        if share == 0:  # fewer examples left than open groups: one each to a random subset
            quota[rng.choice(open_, size=left, replace=False)] += 1
            break
        add = np.minimum(sizes[open_] - quota[open_], share)
        quota[open_] += add
        left -= int(add.sum())
    return quota


def draw_indices(masks: torch.Tensor, source: str, examples: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Positions in the training split to calibrate on, and what the draw was. ``masks``: (N, G) bool group
    membership of the training examples."""
    if source not in SOURCES:
        raise ConfigError(f"calibration.source={source!r}; use one of {list(SOURCES)}")
    m = masks.bool().numpy()
    n, g = m.shape
    sizes = m.sum(0)
    rng = np.random.default_rng([int(seed), SOURCES.index(source)])
    extra: dict[str, Any] = {}
    if n == 0:
        raise ConfigError("calibration: the training split is empty")
    if source == "natural":
        chosen = rng.choice(n, size=min(examples, n), replace=False)
    elif source == "worst_group":
        nonempty = np.flatnonzero(sizes > 0)
        if not len(nonempty):
            raise ConfigError("calibration.source=worst_group: no training example belongs to any group")
        group = int(nonempty[np.argmin(sizes[nonempty])])
        members = np.flatnonzero(m[:, group])
        chosen = rng.choice(members, size=min(examples, len(members)), replace=False)
        extra["group_index"] = group
    else:  # group_balanced
        taken = np.zeros(n, dtype=bool)
        quota = _fair_quota(sizes, examples, rng)
        parts = []
        for k in rng.permutation(g):  # random order: overlapping groups do not favour the first
            pool = np.flatnonzero(m[:, k] & ~taken)
            if quota[k] and len(pool):
                pick = rng.choice(pool, size=min(int(quota[k]), len(pool)), replace=False)
                taken[pick] = True
                parts.append(pick)
        chosen = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        extra["quota"] = quota.tolist()
    chosen = np.sort(chosen.astype(np.int64))
    return chosen, extra


def calibration_batches(dm, source: str = "natural", examples: int = 256, seed: int = 0,
                        batch_size: int | None = None) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Padded batches of the drawn training examples (sorted by length: little padding; the order does not
    matter to a calibration statistic) and the record of the draw."""
    from subgroup_robustness.data.datamodule import Collator

    spec = check_calibration({"source": source, "examples": examples, "seed": seed}, "calibration")
    spec["seed"] = 0 if spec["seed"] is None else spec["seed"]
    dm.setup()
    train = dm.splits["train"]
    grouping = dm.primary
    masks = grouping.masks(train.metadata)
    chosen, extra = draw_indices(masks, spec["source"], spec["examples"], spec["seed"])
    names = list(grouping.group_names)
    counts = masks[torch.as_tensor(chosen, dtype=torch.long)].sum(0).tolist() if len(chosen) else [0] * len(names)
    record: dict[str, Any] = {
        "source": spec["source"], "examples_requested": spec["examples"], "examples": int(len(chosen)),
        "seed": spec["seed"], "split": "train",
        "group_counts": {name: int(c) for name, c in zip(names, counts)},
        "group_sizes_train": {name: int(c) for name, c in zip(names, masks.sum(0).tolist())},
        "dataset_index": [int(i) for i in train.index[torch.as_tensor(chosen, dtype=torch.long)].tolist()]
        if len(chosen) <= 4096 else None,
    }
    if "group_index" in extra:
        record["group"] = names[extra["group_index"]]
    if len(chosen) < spec["examples"]:
        record["note"] = (f"{len(chosen)} of {spec['examples']} requested: "
                          + ("the smallest group has no more training examples" if spec["source"] == "worst_group"
                             else "the training split has no more (grouped) examples"))
    order = chosen[np.argsort(train.lengths[chosen], kind="stable")] if len(chosen) else chosen
    collate = Collator(getattr(dm.tokenizer, "pad_token_id", None) or 0)
    bs = int(batch_size or getattr(dm, "eval_batch_size", 64) or 64)
    batches = [collate([train[int(i)] for i in order[s:s + bs]]) for s in range(0, len(order), bs)]
    return batches, record


def calibration_from_spec(dm, calibration: Mapping[str, Any], default_seed: int,
                          batch_size: int | None = None) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """``calibration_batches`` from a compressor's ``calibration`` spec; ``seed: null`` means the run's seed."""
    spec = check_calibration(calibration, "calibration")
    seed = default_seed if spec["seed"] is None else spec["seed"]
    return calibration_batches(dm, spec["source"], spec["examples"], seed, batch_size)
