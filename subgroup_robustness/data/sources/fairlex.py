"""What the four FairLex sources share (Chalkidis et al., ACL 2022; ``coastalcph/fairlex``): reading the
Zenodo release, the hub's parquet export or the hub itself into the normalized table.

The release (``https://zenodo.org/record/6322643/files/<config>.zip``, CC BY-NC-SA 4.0) holds
``train.jsonl``, ``val.jsonl`` and ``test.jsonl``: one record per line, ``{"text": ..., "label": ...,
"attributes": {<attribute>: <value>, ...}}``; multi-label configs (ECtHR) have ``"labels": [...]`` instead
of ``label``. FairLex's loader declares labels and attributes as ``ClassLabel``s, so a value may be an id
(a JSON number) or a name (a string); both are read. A string is looked up among the names first (the
ECtHR articles are themselves digits, "2", "P1-1"), then read as an id. Names match case-, accent-,
space-, hyphen- and underscore-insensitively, against our snake_case names and FairLex's own spelling.

Multi-label: the table's integer ``label`` column holds the label set as a bitmask (bit k = label k;
0 = the empty set, ECtHR's "no violation"). The datamodule carries it unchanged; the classifier decodes
it (``models.classifier.multi_hot``). See docs/datasets.md, "Multi-label datasets".

Checksums: FairLex publishes none, and the release cannot be downloaded here. ``Spec.sha256`` and
``Spec.size`` stay ``None`` until someone with the files records them: every download prints the
archive's sha256 and size, and ``python -m subgroup_robustness.data dataset=<config>`` prints the split
sizes and group counts. A recorded value is checked on every later download.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.data.sources.fetch import cached_fetch, read_hub
from subgroup_robustness.data.sources.files import REPLACE, corrupt, extract_once, fix_for, read_jsonl, verify_sha256
from subgroup_robustness.data.sources.splits import SPLITS  # (no ``load`` here: this module is not a source)
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError

log = logging.getLogger(__name__)

ZENODO = "https://zenodo.org/record/6322643/files"
FILES = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
ALIASES = {"train": {"train"}, "val": {"val", "validation", "dev"}, "test": {"test"}}
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
FORMATS = ("auto", "fairlex", "hub")
HUB_ID = "coastalcph/fairlex"


@dataclass(frozen=True)
class Spec:
    """One FairLex config: its vocabulary (ours, in FairLex's id order), FairLex's own spelling of it, and
    what is known about its release file."""

    name: str
    labels: tuple[str, ...]
    attributes: Mapping[str, tuple[str, ...]]
    release_labels: tuple[str, ...] = ()                                   # FairLex's ClassLabel names
    release_attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    multi_label: bool = False
    # whether a string of digits that is no label name is read as a label id; off where the label names
    # are themselves digits (ECtHR's articles "2", "3", ...: "4" is then an error, never article 8)
    digit_label_ids: bool = True
    sha256: str | None = None      # of <name>.zip; None = not recorded yet (printed on download)
    size: int | None = None        # bytes of <name>.zip
    split_sizes: Mapping[str, int] | None = None  # rows per split; None = not recorded yet

    @property
    def url(self) -> str:
        return f"{ZENODO}/{self.name}.zip"

    @property
    def label_column(self) -> str:
        return "labels" if self.multi_label else "label"

    @property
    def how_to_point(self) -> str:
        return (f"Set dataset.source.path to a folder (or FairLex's {self.name}.zip) with FairLex's train.jsonl, "
                "val.jsonl and test.jsonl, or with the hub's parquet export (one file or folder per split: train, "
                "validation, test).")


# ---- values ---------------------------------------------------------------------------------------------
def norm(s: str) -> str:
    """Case-, accent-, space-, hyphen- and underscore-insensitive form of a name ('Région lémanique' =
    'region_lemanique')."""
    s = unicodedata.normalize("NFKD", s.strip().lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return re.sub(r"[\s_\-]+", " ", s)


def code(value: Any, names: Sequence[str], field: str, where: str, *, what: str,
         release: Sequence[str] = (), digit_ids: bool = True) -> int:
    """A FairLex value to its index in ``names``: an id (JSON number), or a name (ours or FairLex's ``release``
    spelling, which has the same order), or (``digit_ids``) a string of digits read as an id."""
    names = list(names)
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        idx = int(value)
    elif isinstance(value, str):
        lookup = {norm(n): i for spelling in (release, names) for i, n in enumerate(spelling)}
        if norm(value) in lookup:
            idx = lookup[norm(value)]
        elif digit_ids and value.strip().isdigit():
            idx = int(value.strip())
        else:
            shown = list(release) or names
            raise CorruptDataError(f"{what}: {where}: unknown {field} {value!r}; FairLex's values are {shown}")
    else:
        raise CorruptDataError(f"{what}: {where}: {field} is {value!r}; expected an id or one of {list(release) or names}")
    if not 0 <= idx < len(names):
        raise CorruptDataError(f"{what}: {where}: {field} id {idx} is outside 0..{len(names) - 1} ({names})")
    return idx


def bitmask(values: Any, names: Sequence[str], field: str, where: str, *, what: str,
            release: Sequence[str] = (), digit_ids: bool = True) -> int:
    """A multi-label value (a list of ids or names; empty = no label) as a bitmask: bit k = label k."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise CorruptDataError(f"{what}: {where}: {field} is {values!r}; expected a list of labels (empty = none)")
    out = 0
    for v in values:
        out |= 1 << code(v, names, field, where, what=what, release=release, digit_ids=digit_ids)
    return out


def decode_bitmask(mask: int, names: Sequence[str]) -> list[str]:
    """The label names of a bitmask (for describing rows and tests)."""
    return [n for k, n in enumerate(names) if int(mask) >> k & 1]


# ---- records --------------------------------------------------------------------------------------------
def rows_to_frame(spec: Spec, rows: Iterable[Mapping], split: str, where: str) -> pd.DataFrame:
    """FairLex records (attributes nested, release) or hub rows (attributes as columns) to our table."""
    out: dict[str, list] = {"text": [], "label": [], **{a: [] for a in spec.attributes}}
    col = spec.label_column
    for i, row in enumerate(rows, 1):
        at = f"{where} record {i}"
        if "text" not in row or col not in row:
            raise CorruptDataError(f"{spec.name}: {at} has no 'text'/{col!r}; found {sorted(row)[:8]}")
        attrs = row.get("attributes") if isinstance(row.get("attributes"), Mapping) else row
        out["text"].append("" if row["text"] is None else str(row["text"]))
        if spec.multi_label:
            out["label"].append(bitmask(row[col], spec.labels, "labels", at, what=spec.name,
                                        release=spec.release_labels, digit_ids=spec.digit_label_ids))
        else:
            out["label"].append(code(row[col], spec.labels, "label", at, what=spec.name,
                                     release=spec.release_labels, digit_ids=spec.digit_label_ids))
        for attr, names in spec.attributes.items():
            if attr not in attrs:
                raise CorruptDataError(f"{spec.name}: {at} has no attribute {attr!r}")
            out[attr].append(code(attrs[attr], names, attr, at, what=spec.name,
                                  release=spec.release_attributes.get(attr, ())))
    df = pd.DataFrame(out)
    df["split"] = split
    return df


def read_file(spec: Spec, path: Path, fix: str = REPLACE) -> list[Mapping]:
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise DataUnavailableError(f"{spec.name}: reading {path} needs a parquet engine: `pip install pyarrow`.") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for broken files
            raise corrupt(spec.name, path, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})", fix=fix) from None
        return frame.to_dict("records")
    return read_jsonl(path, spec.name, fix)


def split_files(spec: Spec, folder: Path) -> dict[str, list[Path]]:
    """Files per split, recognized by a split word in their path (``val.jsonl``, ``fscs/train/0000.parquet``)."""
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".jsonl", ".json", ".parquet") and not f.name.startswith("."):
            words = set(re.split(r"[^a-z]+", str(f.relative_to(folder)).lower()))
            hits = [s for s, names in ALIASES.items() if words & names]
            if len(hits) == 1:
                found[hits[0]].append(f)
    missing = [s for s, files in found.items() if not files]
    if missing:
        raise DataUnavailableError(f"{spec.name}: no {missing} split file(s) in {folder}. {spec.how_to_point}")
    return found


def read_folder(spec: Spec, folder: Path, cache_dir: Path | None = None) -> pd.DataFrame:
    frames = [rows_to_frame(spec, read_file(spec, f, fix_for(f, cache_dir)), split, str(f))
              for split, files in split_files(spec, folder).items() for f in files]
    return pd.concat(frames, ignore_index=True)


def check_archive(spec: Spec, archive: Path) -> None:
    """The recorded sha256 of the release zip when there is one; otherwise print it, to be recorded."""
    size = archive.stat().st_size
    if spec.sha256 is None:
        from subgroup_robustness.utils.io import sha256_file

        digest = sha256_file(archive)
        msg = (f"{spec.name}: downloaded {archive.name}: sha256 {digest}, {size:,} bytes (FairLex publishes no "
               f"checksum; record them in subgroup_robustness/data/sources/{spec.name}.py, SPEC)")
        log.info(msg)
        print(f"[{spec.name}] {msg}", flush=True)
        return
    verify_sha256(archive, spec.sha256, spec.name, "")
    if spec.size is not None and size != spec.size:
        raise CorruptDataError(f"{spec.name}: {archive} has {size:,} bytes, expected {spec.size:,}.")


def fetch(spec: Spec, cache_dir: Path, url: str | None = None) -> Path:
    return cached_fetch(url or spec.url, cache_dir / f"fairlex_{spec.name}", list(FILES.values()),
                        archive=cache_dir / f"{spec.name}.zip", what=spec.name, how_to_point=spec.how_to_point,
                        verify=lambda archive: check_archive(spec, archive))


def read_from_hub(spec: Spec, hub_id: str, config: str) -> pd.DataFrame:
    ds = read_hub(hub_id, config, list(HUB_SPLITS.values()), what=spec.name, how_to_point=spec.how_to_point,
                  instead="dataset.source.format=fairlex (downloads FairLex's files, no extra dependency)")
    return pd.concat([rows_to_frame(spec, ds[h].to_pandas().to_dict("records"), s, f"{hub_id} {h}")
                      for s, h in HUB_SPLITS.items()], ignore_index=True)


def check_split_sizes(spec: Spec, df: pd.DataFrame) -> None:
    """A recorded split size that the files do not have is logged (another release, or a partial copy)."""
    if not spec.split_sizes:
        return
    found = df["split"].value_counts().to_dict()
    differ = {s: (found.get(s, 0), n) for s, n in spec.split_sizes.items() if found.get(s, 0) != n}
    if differ:
        log.warning("%s: split sizes differ from the recorded release (found, recorded): %s", spec.name, differ)


def load_config(spec: Spec, cache_dir: str | Path, path: str | Path | None = None, format: str = "auto",  # noqa: A002
         url: str | None = None, hub_id: str = HUB_ID, hub_config: str | None = None) -> pd.DataFrame:
    """The normalized table of one FairLex config: text, label, one column per attribute, split."""
    if format not in FORMATS:
        raise ConfigError(f"{spec.name}: dataset.source.format={format!r}; choose one of {list(FORMATS)}")
    cache_dir = Path(cache_dir).expanduser()
    if format == "hub":
        df = read_from_hub(spec, hub_id, hub_config or spec.name)
    elif not path:
        df = read_folder(spec, fetch(spec, cache_dir, url), cache_dir)
    else:
        src = Path(path).expanduser()
        if not src.exists():
            raise DataUnavailableError(f"{spec.name}: dataset.source.path={path} does not exist. {spec.how_to_point}")
        if src.suffix == ".zip":  # extract once into the cache: the zip's folder may be read-only
            src = extract_once(src, cache_dir, list(FILES.values()), spec.name)
        if not src.is_dir():
            raise DataUnavailableError(f"{spec.name}: dataset.source.path={path} is neither a folder nor a zip. "
                                       f"{spec.how_to_point}")
        df = read_folder(spec, src, cache_dir)
    check_split_sizes(spec, df)
    return df
