"""The split vocabulary and the seeded split that sources use when their data ships without one.

Every source returns a ``split`` column with values in :data:`SPLITS`; the datamodule, the describe
command and the group counts iterate splits in this order. Sources whose files are one undivided set
(RedditBias, a single MultiNLI jsonl file) split it here, inside every group, so even a small group
keeps the configured proportions in train, val and test.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.utils.errors import ConfigError

SPLITS = ("train", "val", "test")


def stratified_split(strata: Sequence, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign train/val/test inside every stratum with a seeded shuffle, so each group keeps the proportions."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ConfigError(f"dataset.source.split_fractions={list(fractions)}: give three non-negative numbers "
                          "summing to 1 (train, val, test), e.g. [0.8, 0.1, 0.1]")
    strata = pd.Series(list(strata)).astype(str)
    rng = np.random.default_rng(seed)
    out = np.empty(len(strata), dtype=object)
    for key in sorted(strata.unique()):
        idx = np.flatnonzero((strata == key).to_numpy())
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        out[idx[:n_train]] = "train"
        out[idx[n_train:n_train + n_val]] = "val"
        out[idx[n_train + n_val:]] = "test"
    return out
