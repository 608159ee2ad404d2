"""MultiNLI (Williams et al., NAACL 2018) with group_DRO's negation groups (Sagawa et al., ICLR 2020).

Labels follow group_DRO, by name: contradiction=0, entailment=1, neutral=2 (the hub numbers them
differently, so hub rows are mapped through their names). The attribute ``has_negation`` is group_DRO's
``sentence2_has_negation``: after removing ``string.punctuation``, lower-casing and splitting on single
spaces, the hypothesis contains nobody, no, never or nothing. Groups = label x has_negation = 6.

Where the rows come from (``format``; ``auto`` picks from ``path``):
- ``official``: ``multinli_1.0_{train,dev_matched,dev_mismatched}.jsonl`` (a folder, or the zip itself);
  with no ``path`` the official zip is downloaded once (MD5-checked) into the cache.
- ``glue``: GLUE's MNLI ``train.tsv``, ``dev_matched.tsv``, ``dev_mismatched.tsv``.
- ``jsonl``: one local file with ``premise``, ``hypothesis``, ``label`` strings; split here.
- ``hub``: ``nyu-mll/multi_nli`` through the ``datasets`` library (optional dependency).

Splits: group_DRO's ``metadata_random.csv`` (the paper's split) when ``metadata_csv`` is given;
otherwise official train, a seeded group-stratified validation carved out of train, and dev-matched as
test; a single file is split train/val/test here, seeded and stratified by group.
"""

from __future__ import annotations

import csv
import logging
import string
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.data.sources.fetch import cached_fetch, download_url, read_hub
from subgroup_robustness.data.sources.files import (
    REPLACE, corrupt, extract_once, fix_for, iter_jsonl, read_csv, verify_md5,
)
from subgroup_robustness.data.sources.splits import stratified_split
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError

log = logging.getLogger(__name__)

NAME = "multinli"
# the vocabulary (conf/dataset/multinli*.yaml reads it through ${sr.vocab:multinli,...})
LABELS = ("contradiction", "entailment", "neutral")  # group_DRO's ids
ATTRIBUTES = {"has_negation": ("no_negation", "negation")}
HUB_LABELS = ("entailment", "neutral", "contradiction")  # nyu-mll/multi_nli's ClassLabel order
NEGATION_WORDS = frozenset({"nobody", "no", "never", "nothing"})  # Gururangan et al. 2018, via group_DRO
PARTS = ("train", "dev_matched", "dev_mismatched")
OFFICIAL_FILES = {p: f"multinli_1.0_{p}.jsonl" for p in PARTS}
GLUE_FILES = {p: f"{p}.tsv" for p in PARTS}
HUB_SPLITS = {"train": "train", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
OFFICIAL_URL = "https://cims.nyu.edu/~sbowman/multinli/multinli_1.0.zip"
OFFICIAL_MD5 = "0f70aaf66293b3c088a864891db51353"  # the value torchtext checks
METADATA_URL = ("https://raw.githubusercontent.com/kohpangwei/group_DRO/master/"
                "dataset_metadata/multinli/metadata_random.csv")
FORMATS = ("auto", "official", "glue", "jsonl", "hub")

_PUNCT = str.maketrans("", "", string.punctuation)

HOW_TO_POINT = (
    "Point dataset.source.path at one of: a folder (or multinli_1.0.zip) with "
    "multinli_1.0_train.jsonl and multinli_1.0_dev_matched.jsonl (+ _dev_mismatched.jsonl); a folder with "
    "GLUE's MNLI train.tsv and dev_matched.tsv (+ dev_mismatched.tsv); or one .jsonl file with premise, "
    "hypothesis and label strings (e.g. ../shared/data/multinli/dev_matched.jsonl)."
)


def has_negation(sentence: object) -> bool:
    """group_DRO's tokenization exactly: strip ASCII punctuation, lower-case, split on single spaces."""
    if not isinstance(sentence, str):
        return False
    return not NEGATION_WORDS.isdisjoint(sentence.translate(_PUNCT).lower().split(" "))


# ---- readers: each returns {part: DataFrame(premise, hypothesis, gold)} --------------------------------
def read_fields(path: Path, fields: Sequence[str], what: str, fix: str = REPLACE) -> list[list]:
    """One list per field; only these fields are kept (official records carry large parse trees)."""
    cols: list[list] = [[] for _ in fields]
    for i, obj in iter_jsonl(path, what, fix):
        try:
            for col, f in zip(cols, fields):
                col.append(obj[f])
        except KeyError:
            raise CorruptDataError(
                f"{what}: {path}, line {i}: no field(s) {[f for f in fields if f not in obj]}; found {sorted(obj)[:8]}"
            ) from None
    return cols


def _frame(premise, hypothesis, gold) -> pd.DataFrame:
    return pd.DataFrame({"premise": list(premise), "hypothesis": list(hypothesis), "gold": list(gold)})


def _local_jsonl(path: Path) -> pd.DataFrame:
    """The premise/hypothesis/label layout; official records (sentence1/sentence2/gold_label) work too."""
    first = next(iter_jsonl(path, NAME), (0, {}))[1]
    fields = ("sentence1", "sentence2", "gold_label") if "sentence1" in first else ("premise", "hypothesis", "label")
    return _frame(*read_fields(path, fields, NAME))


def _official_folder(path: Path) -> Path:
    if (path / "multinli_1.0").is_dir():
        return path / "multinli_1.0"
    return path


def _read_parts(folder: Path, names: Mapping[str, str], parts: Sequence[str], read: Callable[[Path], pd.DataFrame],
                kind: str) -> dict[str, pd.DataFrame]:
    """Each part's file in ``folder``, read; a missing one is named, with how to point at the data."""
    out = {}
    for part in parts:
        f = folder / names[part]
        if not f.exists():
            raise DataUnavailableError(f"{NAME}: missing {f}{kind}. {HOW_TO_POINT}")
        out[part] = read(f)
    return out


def read_official(path: Path, parts: Sequence[str], cache_dir: Path) -> dict[str, pd.DataFrame]:
    if path.suffix == ".zip":  # a user's multinli_1.0.zip: extract once into the cache (its folder may be read-only)
        path = extract_once(path, cache_dir, [OFFICIAL_FILES[p] for p in parts], NAME)

    def read(f: Path) -> pd.DataFrame:
        return _frame(*read_fields(f, ("sentence1", "sentence2", "gold_label"), NAME, fix_for(f, cache_dir)))

    return _read_parts(_official_folder(path), OFFICIAL_FILES, parts, read, "")


def read_glue(folder: Path, parts: Sequence[str]) -> dict[str, pd.DataFrame]:
    return _read_parts(folder, GLUE_FILES, parts, read_glue_tsv, " (GLUE MNLI)")


def read_glue_tsv(path: Path) -> pd.DataFrame:
    """GLUE's TSVs hold unescaped quotes, so no quoting (as GLUE's own reader); short rows mean truncation."""
    columns = ("sentence1", "sentence2", "gold_label")
    complete = path.stat().st_size > 0  # an empty file is reported by the parser
    df = read_csv(path, NAME, complete=complete, sep="\t", quoting=csv.QUOTE_NONE, dtype=str,
                  keep_default_na=False, usecols=lambda c: c in columns, encoding="utf-8")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CorruptDataError(f"{NAME}: {path} has no column(s) {missing}; is it GLUE's MNLI TSV?")
    short = df["gold_label"].isna()
    if short.any():
        line = int(np.flatnonzero(short)[0]) + 2  # unquoted: one row per line, after the header
        raise corrupt(NAME, path, "the row is short of fields", line=line)
    return _frame(df["sentence1"], df["sentence2"], df["gold_label"])


def hub_frame(rows: pd.DataFrame, names: Sequence[str] = HUB_LABELS) -> pd.DataFrame:
    """Hub rows (premise, hypothesis, integer label in the hub's order; -1 = no gold label) to names."""
    lookup = dict(enumerate(names))
    gold = [lookup.get(int(v), "-") for v in rows["label"]]
    return _frame(rows["premise"], rows["hypothesis"], gold)


def read_from_hub(hub_id: str, parts: Sequence[str]) -> dict[str, pd.DataFrame]:
    ds = read_hub(hub_id, None, [HUB_SPLITS[p] for p in parts], what=NAME, how_to_point=HOW_TO_POINT,
                  instead="dataset.source.format=official (downloads multinli_1.0.zip, no extra dependency)")
    out = {}
    for part in parts:
        split = ds[HUB_SPLITS[part]]
        names = getattr(split.features.get("label"), "names", None) or HUB_LABELS
        out[part] = hub_frame(split.to_pandas(), names)
    return out


# ---- downloads -----------------------------------------------------------------------------------------
def fetch_official(cache_dir: Path, url: str = OFFICIAL_URL, md5: str | None = OFFICIAL_MD5) -> Path:
    """The extracted official jsonl files in the cache, downloading the zip (227 MB) the first time."""
    return cached_fetch(url, cache_dir / "multinli_1.0", list(OFFICIAL_FILES.values()),
                        archive=cache_dir / "multinli_1.0.zip", what=NAME, how_to_point=HOW_TO_POINT,
                        verify=lambda archive: verify_md5(archive, md5, NAME))


def fetch_metadata(cache_dir: Path, url: str = METADATA_URL) -> Path:
    dest = cache_dir / "metadata_random.csv"
    if dest.exists():
        return dest
    return download_url(url, dest, what=f"{NAME} metadata",
                        advice=f"Download group_DRO's metadata_random.csv from {url} yourself and set "
                               "dataset.source.metadata_csv to its path.")


# ---- assembly ------------------------------------------------------------------------------------------
def _normalize(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Drop no-consensus rows ('-'), map label names to group_DRO ids, compute the negation attribute."""
    gold = frame["gold"].astype(str).str.strip().str.lower()
    keep = ~gold.isin(["-", "", "nan", "none"])
    ids = gold[keep].map({n: i for i, n in enumerate(LABELS)})
    if ids.isna().any():
        bad = sorted(set(gold[keep][ids.isna()]))[:5]
        raise CorruptDataError(f"{NAME}: unknown label(s) {bad} in {where}; expected {list(LABELS)} (or '-').")
    hyp = frame["hypothesis"][keep]
    return pd.DataFrame({
        "text": frame["premise"][keep].fillna("").astype(str).to_numpy(),
        "text_pair": hyp.fillna("").astype(str).to_numpy(),
        "label": ids.astype(int).to_numpy(),
        "has_negation": np.fromiter((has_negation(h) for h in hyp), dtype=np.int64, count=len(hyp)),
    })


def _carve(strata: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """A seeded, per-group share of rows (at least none, at most all but one per group)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{NAME}: val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    out = np.zeros(len(strata), dtype=bool)
    values = strata.to_numpy()
    for key in sorted(set(values)):
        idx = np.flatnonzero(values == key)
        k = int(round(fraction * len(idx)))
        out[rng.permutation(idx)[:k]] = True
    return out


def _strata(df: pd.DataFrame) -> pd.Series:
    return df["label"].astype(str) + ":" + df["has_negation"].astype(str)


def apply_metadata(df: pd.DataFrame, metadata: Path, fix: str = REPLACE) -> pd.DataFrame:
    """group_DRO's split, aligned row by row with train + dev_matched + dev_mismatched minus the '-' rows."""
    try:
        meta = read_csv(metadata, NAME, fix, index_col=0)
    except OSError as exc:
        raise DataUnavailableError(f"{NAME}: cannot read {metadata} ({exc}); check dataset.source.metadata_csv.") from None
    need = ["gold_label", "sentence2_has_negation", "split"]
    if any(c not in meta.columns for c in need):
        raise CorruptDataError(f"{NAME}: {metadata} needs columns {need} (group_DRO's metadata_random.csv); found {list(meta.columns)}")
    if len(meta) != len(df):
        raise CorruptDataError(
            f"{NAME}: {metadata} has {len(meta)} rows but train + dev_matched + dev_mismatched have {len(df)} "
            "labelled pairs; the metadata belongs to the full official MultiNLI 1.0 (or its GLUE/hub copies)."
        )
    if not np.array_equal(meta["gold_label"].to_numpy(dtype=np.int64), df["label"].to_numpy()):
        raise CorruptDataError(f"{NAME}: the labels in {metadata} do not match the text rows: the files are misaligned.")
    csv_neg = meta["sentence2_has_negation"].to_numpy(dtype=np.int64)
    differ = int((csv_neg != df["has_negation"].to_numpy()).sum())
    if differ:
        log.warning("%s: %d rows' negation flag differs from %s; using the metadata's", NAME, differ, metadata)
    split_ids = meta["split"].to_numpy(dtype=np.int64)
    if not np.isin(split_ids, [0, 1, 2]).all():
        raise CorruptDataError(f"{NAME}: {metadata} has split values other than 0/1/2")
    out = df.copy()
    out["has_negation"] = csv_neg
    out["split"] = np.asarray(["train", "val", "test"], dtype=object)[split_ids]
    return out


def _select_labels(df: pd.DataFrame, labels: Sequence[int] | None) -> pd.DataFrame:
    """Binary variants: keep the listed group_DRO label ids and renumber them 0..k-1 (the paper's code)."""
    if labels is None:
        return df
    labels = [int(x) for x in labels]
    if len(set(labels)) != len(labels) or not set(labels) <= set(range(len(LABELS))) or len(labels) < 2:
        raise ConfigError(f"{NAME}: labels must be two or more distinct ids among 0, 1, 2; got {labels}")
    df = df[df["label"].isin(labels)].copy()
    df["label"] = df["label"].map({old: new for new, old in enumerate(labels)}).astype(int)
    return df.reset_index(drop=True)


def detect_format(path: Path | None) -> str:
    if path is None:
        return "official"
    if path.is_dir():
        folder = _official_folder(path)
        if (folder / OFFICIAL_FILES["train"]).exists() or (folder / OFFICIAL_FILES["dev_matched"]).exists():
            return "official"
        if (path / GLUE_FILES["train"]).exists() or (path / GLUE_FILES["dev_matched"]).exists():
            return "glue"
        raise DataUnavailableError(f"{NAME}: {path} holds neither the official jsonl files nor GLUE TSVs. {HOW_TO_POINT}")
    if path.suffix == ".zip":
        return "official"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    raise DataUnavailableError(f"{NAME}: cannot tell the format of {path}. {HOW_TO_POINT}")


def load(
    cache_dir: str | Path,
    path: str | Path | None = None,
    format: str = "auto",  # noqa: A002 - the config key users write
    metadata_csv: str | Path | None = None,
    labels: Sequence[int] | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.025,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    hub_id: str = "nyu-mll/multi_nli",
    url: str = OFFICIAL_URL,
    md5: str | None = OFFICIAL_MD5,
    metadata_url: str = METADATA_URL,
) -> pd.DataFrame:
    """The normalized table: text (premise), text_pair (hypothesis), label, has_negation, split."""
    if format not in FORMATS:
        raise ConfigError(f"{NAME}: dataset.source.format={format!r}; choose one of {list(FORMATS)}")
    cache_dir = Path(cache_dir).expanduser()
    src = Path(path).expanduser() if path else None
    if src is not None and not src.exists():
        raise DataUnavailableError(f"{NAME}: dataset.source.path={path} does not exist. {HOW_TO_POINT}")
    fmt = detect_format(src) if format == "auto" else format
    if fmt in ("glue", "jsonl") and src is None:
        raise DataUnavailableError(f"{NAME}: dataset.source.format={fmt} needs dataset.source.path. {HOW_TO_POINT}")
    if fmt == "jsonl" and metadata_csv:
        raise ConfigError(f"{NAME}: metadata_csv needs the full MultiNLI (train + dev_matched + dev_mismatched), "
                          "not a single jsonl file; drop dataset.source.metadata_csv or point path at the full data.")

    if fmt == "jsonl":
        df = _normalize(_local_jsonl(src), str(src))
        df = _select_labels(df, labels)
        df["split"] = stratified_split(_strata(df), split_fractions, split_seed)
        return df

    parts = PARTS if metadata_csv else PARTS[:2]
    if fmt == "official":
        raw = read_official(src if src is not None else fetch_official(cache_dir, url, md5), parts, cache_dir)
    elif fmt == "glue":
        raw = read_glue(src, parts)
    else:
        raw = read_from_hub(hub_id, parts)
    frames = {p: _normalize(raw[p], f"{fmt} {p}") for p in parts}

    if metadata_csv:
        meta = fetch_metadata(cache_dir, metadata_url) if str(metadata_csv) == "download" else Path(metadata_csv).expanduser()
        if not meta.is_file():
            raise DataUnavailableError(f"{NAME}: dataset.source.metadata_csv={metadata_csv} does not exist "
                                       f"(group_DRO's file is at {METADATA_URL}; `download` fetches it).")
        df = apply_metadata(pd.concat([frames[p] for p in PARTS], ignore_index=True), meta, fix_for(meta, cache_dir))
        return _select_labels(df, labels)

    train = _select_labels(frames["train"], labels)
    test = _select_labels(frames["dev_matched"], labels)
    train["split"] = np.where(_carve(_strata(train), val_fraction, split_seed), "val", "train")
    test["split"] = "test"
    return pd.concat([train, test], ignore_index=True)
