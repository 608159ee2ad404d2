"""CivilComments-WILDS (Borkan et al. 2019; Koh et al., ICML 2021): the WILDS release of the Jigsaw
comments, ``all_data_with_identities.csv``, as the paper's code (and WILDS, and JTT) read it.

Label = ``toxicity >= 0.5``. Attributes, each thresholded at >= 0.5: ``identity_any`` and the 8 WILDS
identities (male, female, LGBTQ, christian, muslim, other_religions, black, white). Splits = the CSV's
``split`` column. The dataset config defines two groupings: the paper's 4 disjoint groups
(toxic x identity_any) and WILDS' 16 overlapping ones (each identity = 1 x label); a comment that
mentions no identity counts in the average but in none of the 16.

With no ``path`` the WILDS CodaLab bundle (a 90.6 MB tar.gz) is downloaded once into the cache. No
checksum of it is published; the gzip CRC is verified, so a cut or garbled download is detected.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from pathlib import Path
from typing import Mapping

import pandas as pd

from subgroup_robustness.data.sources.fetch import cached_fetch
from subgroup_robustness.data.sources.files import REPLACE, corrupt, fix_for, read_csv
from subgroup_robustness.data.sources.splits import SPLITS
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from subgroup_robustness.utils.io import atomic_copy

NAME = "civilcomments"
CSV_NAME = "all_data_with_identities.csv"
URL = "https://worksheets.codalab.org/rest/bundles/0x8cd3de0634154aeaad2ee6eb96723c6e/contents/blob/"
# the vocabulary (conf/dataset/civilcomments.yaml reads it through ${sr.vocab:civilcomments,...}); every
# attribute is a column of the CSV of the same name
LABELS = ("non_toxic", "toxic")
IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")  # WILDS' 8
ATTRIBUTES = {"identity_any": ("no_identity", "identity"), **{i: ("no", "yes") for i in IDENTITIES}}
SCORES = ("toxicity", *ATTRIBUTES)
COLUMNS = ("comment_text", "split", *SCORES)

HOW_TO_POINT = (
    f"Set dataset.source.path to WILDS' {CSV_NAME} (or the folder holding it, e.g. <wilds root>/civilcomments_v1.0)."
)


def find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in (path / CSV_NAME, path / "civilcomments_v1.0" / CSV_NAME):
        if candidate.exists():
            return candidate
    raise DataUnavailableError(f"{NAME}: no {CSV_NAME} in {path}. {HOW_TO_POINT}")


def verify_gzip(archive: Path) -> None:
    """Read the whole stream: a truncated file ends early, a garbled one fails its CRC."""
    with open(archive, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            raise CorruptDataError(f"{NAME}: {archive} is not a gzip archive.")
    try:
        with gzip.open(archive, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptDataError(f"{NAME}: {archive} is corrupt or truncated ({exc}).") from None


def extract_csv(archive: Path, targets: Mapping[str, Path]) -> None:
    """The bundle's CSV (wherever it sits in the tar) to its target, atomically."""
    try:
        with tarfile.open(archive, "r:gz") as tf:
            member = next((m for m in tf if m.isfile() and Path(m.name).name == CSV_NAME), None)
            if member is None:
                raise CorruptDataError(f"{NAME}: {archive} holds no {CSV_NAME}; it is not the WILDS bundle.")
            atomic_copy(tf.extractfile(member), targets[CSV_NAME])
    except tarfile.TarError as exc:
        raise CorruptDataError(f"{NAME}: {archive} is not a readable tar archive ({exc}).") from None


def fetch(cache_dir: Path, url: str = URL) -> Path:
    folder = cached_fetch(url, cache_dir, [CSV_NAME], archive=cache_dir / "archive.tar.gz", what=NAME,
                          how_to_point=HOW_TO_POINT, place=CSV_NAME, verify=verify_gzip, unpack=extract_csv)
    return folder / CSV_NAME


def read_table(path: Path, fix: str = REPLACE) -> pd.DataFrame:
    raw = read_csv(
        path, NAME, fix, complete=True, usecols=lambda c: c in COLUMNS, dtype={"comment_text": str, "split": str},
        keep_default_na=False, na_values={c: [""] for c in SCORES},  # a comment reading "NA" stays text
    )
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise CorruptDataError(f"{NAME}: {path} has no column(s) {missing}; is it WILDS' {CSV_NAME}?")
    return raw


def load(cache_dir: str | Path, path: str | Path | None = None, url: str = URL, threshold: float = 0.5) -> pd.DataFrame:
    """The normalized table: text, label (toxic), identity_any, the 8 identities, split."""
    cache_dir = Path(cache_dir).expanduser()
    if path:
        src = Path(path).expanduser()
        if not src.exists():
            raise DataUnavailableError(f"{NAME}: dataset.source.path={path} does not exist. {HOW_TO_POINT}")
        csv_path = find_csv(src)
    else:
        csv_path = fetch(cache_dir, url)
    raw = read_table(csv_path, fix_for(csv_path, cache_dir))
    scores = raw[list(SCORES)].apply(pd.to_numeric, errors="coerce")
    bad = scores["toxicity"].isna()
    if bad.any():
        first = int(bad.to_numpy().argmax())
        raise corrupt(NAME, csv_path, f"record {first + 1} has no numeric toxicity", text=str(raw["toxicity"].iloc[first]),
                      fix=fix_for(csv_path, cache_dir))
    bad_split = ~raw["split"].isin(SPLITS)
    if bad_split.any():
        raise CorruptDataError(
            f"{NAME}: {csv_path} has split values {sorted(set(raw['split'][bad_split].astype(str)))[:5]}; "
            f"expected {list(SPLITS)}."
        )
    out = pd.DataFrame({"text": raw["comment_text"].fillna("").astype(str), "label": (scores["toxicity"] >= threshold)})
    for col in ATTRIBUTES:
        out[col] = scores[col] >= threshold  # an unannotated (blank) identity counts as absent, as in WILDS
    out = out.astype({c: int for c in out.columns if c != "text"})
    out["split"] = raw["split"].to_numpy()
    return out
