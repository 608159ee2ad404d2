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

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from subgroup_robustness.data.sources.fetch import cached_fetch, read_hub
from subgroup_robustness.data.sources.files import REPLACE, corrupt, extract_once, fix_for, read_jsonl
from subgroup_robustness.data.sources.splits import SPLITS
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError

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
FILES = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
ALIASES = {"train": {"train"}, "val": {"val", "validation", "dev"}, "test": {"test"}}
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
FORMATS = ("auto", "fairlex", "hub")

HOW_TO_POINT = (
    "Set dataset.source.path to a folder (or FairLex's scotus.zip) with FairLex's train.jsonl, val.jsonl and "
    "test.jsonl, or with the hub's parquet export (one file or folder per split: train, validation, test)."
)


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", s.strip().lower())


def code(value: Any, names: Iterable[str], field: str, where: str) -> int:
    """A FairLex value to its index: the hub stores ClassLabel ids, the release may store names."""
    names = list(names)
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        idx = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str):
        lookup = {_norm(n): i for i, n in enumerate(names)}
        if _norm(value) not in lookup:
            raise CorruptDataError(f"{NAME}: {where}: unknown {field} {value!r}; FairLex's values are {names}")
        idx = lookup[_norm(value)]
    else:
        raise CorruptDataError(f"{NAME}: {where}: {field} is {value!r}; expected an id or one of {names}")
    if not 0 <= idx < len(names):
        raise CorruptDataError(f"{NAME}: {where}: {field} id {idx} is outside 0..{len(names) - 1} ({names})")
    return idx


def rows_to_frame(rows: Iterable[Mapping], split: str, where: str) -> pd.DataFrame:
    """FairLex records (attributes nested, release) or hub rows (attributes as columns) to our table."""
    out: dict[str, list] = {"text": [], "label": [], **{a: [] for a in ATTRIBUTES}}
    for i, row in enumerate(rows, 1):
        at = f"{where} record {i}"
        if "text" not in row or "label" not in row:
            raise CorruptDataError(f"{NAME}: {at} has no 'text'/'label'; found {sorted(row)[:8]}")
        attrs = row.get("attributes") if isinstance(row.get("attributes"), Mapping) else row
        out["text"].append("" if row["text"] is None else str(row["text"]))
        out["label"].append(code(row["label"], LABELS, "label", at))
        for attr, names in ATTRIBUTES.items():
            if attr not in attrs:
                raise CorruptDataError(f"{NAME}: {at} has no attribute {attr!r}")
            out[attr].append(code(attrs[attr], names, attr, at))
    df = pd.DataFrame(out)
    df["split"] = split
    return df


def _read_file(path: Path, fix: str = REPLACE) -> list[Mapping]:
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise DataUnavailableError(f"{NAME}: reading {path} needs a parquet engine: `pip install pyarrow`.") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for broken files
            raise corrupt(NAME, path, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})", fix=fix) from None
        return frame.to_dict("records")
    return read_jsonl(path, NAME, fix)


def split_files(folder: Path) -> dict[str, list[Path]]:
    """Files per split, recognized by a split word in their path (``val.jsonl``, ``scotus/train/0000.parquet``)."""
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".jsonl", ".json", ".parquet") and not f.name.startswith("."):
            words = set(re.split(r"[^a-z]+", str(f.relative_to(folder)).lower()))
            hits = [s for s, names in ALIASES.items() if words & names]
            if len(hits) == 1:
                found[hits[0]].append(f)
    missing = [s for s, files in found.items() if not files]
    if missing:
        raise DataUnavailableError(f"{NAME}: no {missing} split file(s) in {folder}. {HOW_TO_POINT}")
    return found


def read_folder(folder: Path, cache_dir: Path | None = None) -> pd.DataFrame:
    frames = [rows_to_frame(_read_file(f, fix_for(f, cache_dir)), split, str(f))
              for split, files in split_files(folder).items() for f in files]
    return pd.concat(frames, ignore_index=True)


def fetch(cache_dir: Path, url: str = URL) -> Path:
    return cached_fetch(url, cache_dir / "fairlex_scotus", list(FILES.values()), archive=cache_dir / "scotus.zip",
                        what=NAME, how_to_point=HOW_TO_POINT)


def read_from_hub(hub_id: str, config: str) -> pd.DataFrame:
    ds = read_hub(hub_id, config, list(HUB_SPLITS.values()), what=NAME, how_to_point=HOW_TO_POINT,
                  instead="dataset.source.format=fairlex (downloads FairLex's files, no extra dependency)")
    return pd.concat([rows_to_frame(ds[h].to_pandas().to_dict("records"), s, f"{hub_id} {h}")
                      for s, h in HUB_SPLITS.items()], ignore_index=True)


def load(
    cache_dir: str | Path,
    path: str | Path | None = None,
    format: str = "auto",  # noqa: A002 - the config key users write
    url: str = URL,
    hub_id: str = "coastalcph/fairlex",
    hub_config: str = "scotus",
) -> pd.DataFrame:
    """The normalized table: text, label (issue area), decision_direction, respondent_type, split."""
    if format not in FORMATS:
        raise ConfigError(f"{NAME}: dataset.source.format={format!r}; choose one of {list(FORMATS)}")
    cache_dir = Path(cache_dir).expanduser()
    if format == "hub":
        return read_from_hub(hub_id, hub_config)
    if not path:
        return read_folder(fetch(cache_dir, url), cache_dir)
    src = Path(path).expanduser()
    if not src.exists():
        raise DataUnavailableError(f"{NAME}: dataset.source.path={path} does not exist. {HOW_TO_POINT}")
    if src.suffix == ".zip":  # extract once into the cache: the zip's folder may be read-only
        src = extract_once(src, cache_dir, list(FILES.values()), NAME)
    if not src.is_dir():
        raise DataUnavailableError(f"{NAME}: dataset.source.path={path} is neither a folder nor a zip. {HOW_TO_POINT}")
    return read_folder(src, cache_dir)
