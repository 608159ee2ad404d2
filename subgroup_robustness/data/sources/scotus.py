"""SCOTUS from FairLex (Chalkidis et al., ACL 2022; ``coastalcph/fairlex``, config ``scotus``), as the
paper's code loads it: the court opinion is the text, ``label`` is the SCDB issue area, and the
attributes are the ones FairLex ships, ``decision_direction`` and ``respondent_type``. Which attribute
forms the groups (label x attribute) is chosen in the dataset config. Splits = FairLex's own.

FairLex's label list has 11 issue areas (its prose says 14, the SCDB total; its ``ClassLabel`` has 11).

Where the rows come from (``format``; ``auto`` = ``fairlex``):
- ``fairlex``: the FairLex release, ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (records with ``text``,
  ``label`` and an ``attributes`` object), downloaded once from Zenodo when no ``path`` is given; a local
  folder may also hold the hub's parquet export (columns text, label, decision_direction, ...).
- ``hub``: ``datasets.load_dataset('coastalcph/fairlex', 'scotus')`` (optional dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from subgroup_robustness.data.sources import fairlex
from subgroup_robustness.data.sources.files import REPLACE

NAME = "scotus"
# the vocabulary, in FairLex's ClassLabel orders (an id in the data is a position here); the dataset
# config reads it through ${sr.vocab:scotus,...}. Names in the data match case-, space- and
# underscore-insensitively: FairLex's "Criminal Procedure" is criminal_procedure.
LABELS = ("criminal_procedure", "civil_rights", "first_amendment", "due_process", "privacy", "attorneys",
          "unions", "economic_activity", "judicial_power", "federalism", "federal_taxation")  # SCDB issue areas
ATTRIBUTES = {
    "decision_direction": ("conservative", "liberal"),
    "respondent_type": ("other", "person", "organization", "public_entity", "facility"),
}
URL = "https://zenodo.org/record/6322643/files/scotus.zip"
FILES = fairlex.FILES
ALIASES = fairlex.ALIASES
HUB_SPLITS = fairlex.HUB_SPLITS
FORMATS = fairlex.FORMATS
# the reading itself is shared with FSCS, CAIL and ECtHR (fairlex.py)
SPEC = fairlex.Spec(name=NAME, labels=LABELS, attributes=ATTRIBUTES)
HOW_TO_POINT = SPEC.how_to_point


def code(value: Any, names: Iterable[str], field: str, where: str) -> int:
    """A FairLex value to its index: the hub stores ClassLabel ids, the release may store names."""
    return fairlex.code(value, list(names), field, where, what=NAME)


def rows_to_frame(rows: Iterable[Mapping], split: str, where: str) -> pd.DataFrame:
    """FairLex records (attributes nested, release) or hub rows (attributes as columns) to our table."""
    return fairlex.rows_to_frame(SPEC, rows, split, where)


def _read_file(path: Path, fix: str = REPLACE) -> list[Mapping]:
    return fairlex.read_file(SPEC, path, fix)


def split_files(folder: Path) -> dict[str, list[Path]]:
    """Files per split, recognized by a split word in their path (``val.jsonl``, ``scotus/train/0000.parquet``)."""
    return fairlex.split_files(SPEC, folder)


def read_folder(folder: Path, cache_dir: Path | None = None) -> pd.DataFrame:
    return fairlex.read_folder(SPEC, folder, cache_dir)


def fetch(cache_dir: Path, url: str = URL) -> Path:
    return fairlex.fetch(SPEC, cache_dir, url)


def read_from_hub(hub_id: str, config: str) -> pd.DataFrame:
    return fairlex.read_from_hub(SPEC, hub_id, config)


def load(
    cache_dir: str | Path,
    path: str | Path | None = None,
    format: str = "auto",  # noqa: A002 - the config key users write
    url: str = URL,
    hub_id: str = "coastalcph/fairlex",
    hub_config: str = "scotus",
) -> pd.DataFrame:
    """The normalized table: text, label (issue area), decision_direction, respondent_type, split."""
    return fairlex.load_config(SPEC, cache_dir, path, format, url, hub_id, hub_config)
