"""A toy dataset source, exactly as docs/extending.md step 1 writes it: a seeded table of short texts with a
binary label and one attribute (dialect), split 60/20/20."""

from __future__ import annotations

import random

import pandas as pd

from subgroup_robustness.data.sources.splits import stratified_split

LABELS = ("negative", "positive")
ATTRIBUTES = {"dialect": ("standard", "regional")}

_WORDS = {0: "bad awful poor sad dull", 1: "good great fine happy nice"}
_DIALECT = {0: "", 1: " innit wee aye"}


def load(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """The normalized table: text, label, dialect, split."""
    rng = random.Random(seed)
    rows = []
    for _ in range(int(n)):
        label, dialect = rng.randint(0, 1), int(rng.random() < 0.25)
        words = " ".join(rng.choices(_WORDS[label].split(), k=5)) + _DIALECT[dialect]
        rows.append({"text": words, "label": label, "dialect": dialect})
    df = pd.DataFrame(rows)
    df["split"] = stratified_split(df["label"] * 2 + df["dialect"], (0.6, 0.2, 0.2), seed)
    return df
