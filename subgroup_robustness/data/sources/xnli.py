"""XNLI (Conneau et al., EMNLP 2018) with group_DRO's negation groups projected across languages.

XNLI's dev and test sets (2,490 + 5,010 pairs) are professional translations of the same English MultiNLI-style
pairs into 14 languages; a pair has one ``pairID`` in every language of a file. The negation attribute is
group_DRO's (``multinli.has_negation``: nobody/no/never/nothing in the hypothesis), computed on the
**English** hypothesis only and carried to every language through the pair's ``pairID`` (within the dev
file and within the test file), so a pair is in the same label x negation group in all 15 languages and no
per-language negation lexicon is needed. The gold label is the English row's too (translations share it).

Table: ``text`` (premise), ``text_pair`` (hypothesis), ``label`` (group_DRO's ids: contradiction=0,
entailment=1, neutral=2, as MultiNLI's source), ``has_negation``, ``language`` (the 15 ISO codes),
``pair_id`` (the file's pairID; ``train-<row>`` for training rows), ``split``: val = XNLI dev, test = XNLI
test, in ``languages``.

Training rows (``train``):
- ``multinli`` (default; zero-shot cross-lingual transfer, XNLI's standard protocol): MultiNLI's English
  training set through the ``multinli`` source (``multinli:`` holds its keys; its download and cache are
  shared with ``dataset=multinli``), all of it (no validation carved out: XNLI dev is the validation split);
- ``translate_train``: XNLI-MT-1.0's machine translations of MultiNLI's training set
  (``XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv``, columns premise/hypo/label with ``contradictory``),
  in ``train_languages``; the files are line-aligned translations, so the negation flag is projected from
  the English file by row;
- ``none``: no training rows (the dataset used only as an extra test set, ``eval_datasets=[xnli]``).

Files (``format``; ``auto`` picks tsv, else jsonl): ``XNLI-1.0/xnli.{dev,test}.tsv`` (tab-separated, no
quoting, header ``language gold_label ... sentence1 sentence2 promptID pairID genre ...``) or
``xnli.{dev,test}.jsonl``; ``path`` = a folder holding them (or ``XNLI-1.0/``), or XNLI-1.0.zip; with no
``path`` the zip is downloaded once. Checksums: none published; the first download prints its sha256.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.data.sources import multinli as mnli
from subgroup_robustness.data.sources.fetch import cached_fetch
from subgroup_robustness.data.sources.files import (
    check_complete, corrupt, extract_once, fix_for, iter_jsonl, read_csv,
)
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError

log = logging.getLogger(__name__)

NAME = "xnli"
LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
# the vocabulary (conf/dataset/xnli.yaml reads it through ${sr.vocab:xnli,...}): MultiNLI's labels and negation
# attribute, so a model trained on dataset=multinli is scored on XNLI with the same ids and groups
LABELS = mnli.LABELS
ATTRIBUTES = {"has_negation": mnli.ATTRIBUTES["has_negation"], "language": LANGUAGES}
LANGUAGE = "language"  # the attribute that says the language (per-language reporting)
PARTS = {"val": "dev", "test": "test"}
TSV_FILES = {p: f"xnli.{p}.tsv" for p in PARTS.values()}
JSONL_FILES = {p: f"xnli.{p}.jsonl" for p in PARTS.values()}
FIELDS = ("language", "gold_label", "sentence1", "sentence2", "pairID")
MT_LABELS = {"contradictory": "contradiction", "contradiction": "contradiction", "entailment": "entailment",
             "neutral": "neutral"}
URL = "https://dl.fbaipublicfiles.com/XNLI/XNLI-1.0.zip"
MT_URL = "https://dl.fbaipublicfiles.com/XNLI/XNLI-MT-1.0.zip"
# not recorded (no download possible where this was written); the first download prints them
SHA256: dict[str, str | None] = {"XNLI-1.0.zip": None, "XNLI-MT-1.0.zip": None}
SIZES = {"val": 2490, "test": 5010}  # pairs per language (the XNLI paper); checked with a warning
FORMATS = ("auto", "tsv", "jsonl")
TRAIN = ("multinli", "translate_train", "none")

HOW_TO_POINT = (
    "Set dataset.source.path to a folder (or XNLI-1.0.zip) with XNLI-1.0's xnli.dev.tsv and xnli.test.tsv "
    "(or xnli.dev.jsonl and xnli.test.jsonl)."
)
MT_HOW_TO_POINT = (
    "Set dataset.source.mt_path to a folder (or XNLI-MT-1.0.zip) with XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv "
    "for English and every training language, or use dataset.source.train=multinli."
)


# ---- reading XNLI-1.0 -----------------------------------------------------------------------------------
def check_fields(path: Path, fix: str) -> None:
    """Every line of an unquoted TSV has the header's number of fields (pandas fills a cut row with empty
    strings when missing values are kept as text, so a short row is found here, with its line). A file
    cut mid-line is reported as such first."""
    check_complete(path, NAME, fix)
    with open(path, "rb") as fh:
        header = fh.readline()
        want = header.count(b"\t")
        for i, raw in enumerate(fh, 2):
            if raw.strip(b"\r\n") and raw.count(b"\t") < want:
                raise corrupt(NAME, path, "the row is short of fields", line=i, text=raw, fix=fix)


def _read_tsv(path: Path, fix: str) -> pd.DataFrame:
    """XNLI's TSV: no quoting (sentences keep raw quotes), one row per line after the header."""
    check_fields(path, fix)
    df = read_csv(path, NAME, fix, complete=True, sep="\t", quoting=csv.QUOTE_NONE, dtype=str,
                  keep_default_na=False, usecols=lambda c: c in FIELDS, encoding="utf-8")
    missing = [c for c in FIELDS if c not in df.columns]
    if missing:
        raise CorruptDataError(f"{NAME}: {path} has no column(s) {missing}; is it XNLI-1.0's xnli.dev/test.tsv?")
    short = df[list(FIELDS)].isna().any(axis=1)
    if short.any():
        raise corrupt(NAME, path, "the row is short of fields", line=int(np.flatnonzero(short)[0]) + 2, fix=fix)
    return df[list(FIELDS)]


def _read_jsonl(path: Path, fix: str) -> pd.DataFrame:
    cols: dict[str, list] = {f: [] for f in FIELDS}
    for i, obj in iter_jsonl(path, NAME, fix):
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise CorruptDataError(f"{NAME}: {path}, line {i}: no field(s) {missing}; found {sorted(obj)[:8]}")
        for f in FIELDS:
            cols[f].append(str(obj[f]))
    return pd.DataFrame(cols)


def folder_of(path: Path) -> Path:
    return path / "XNLI-1.0" if (path / "XNLI-1.0").is_dir() else path


def detect_format(folder: Path) -> str:
    if all((folder / f).exists() for f in TSV_FILES.values()):
        return "tsv"
    if all((folder / f).exists() for f in JSONL_FILES.values()):
        return "jsonl"
    raise DataUnavailableError(f"{NAME}: {folder} holds neither xnli.dev.tsv + xnli.test.tsv nor their .jsonl. "
                               f"{HOW_TO_POINT}")


def read_part(folder: Path, part: str, fmt: str, cache_dir: Path | None) -> pd.DataFrame:
    f = folder / (TSV_FILES if fmt == "tsv" else JSONL_FILES)[part]
    if not f.exists():
        raise DataUnavailableError(f"{NAME}: missing {f}. {HOW_TO_POINT}")
    fix = fix_for(f, cache_dir)
    return _read_tsv(f, fix) if fmt == "tsv" else _read_jsonl(f, fix)


def project(raw: pd.DataFrame, where: str) -> pd.DataFrame:
    """The English row of each pairID gives every language's negation flag (and gold label)."""
    raw = raw.copy()
    raw["language"] = raw["language"].str.strip()
    unknown = sorted(set(raw["language"]) - set(LANGUAGES))
    if unknown:
        raise CorruptDataError(f"{NAME}: {where}: unknown language(s) {unknown[:5]}; XNLI's are {list(LANGUAGES)}")
    en = raw[raw["language"] == "en"]
    if en.empty:
        raise CorruptDataError(f"{NAME}: {where} has no English rows: the negation groups are computed on the "
                               "English hypotheses, so the file must hold them (even when languages excludes en)")
    if en["pairID"].duplicated().any():
        dup = en["pairID"][en["pairID"].duplicated()].iloc[0]
        raise CorruptDataError(f"{NAME}: {where}: pairID {dup!r} has two English rows")
    neg = dict(zip(en["pairID"], (int(mnli.has_negation(h)) for h in en["sentence2"])))
    gold = dict(zip(en["pairID"], en["gold_label"].str.strip().str.lower()))
    orphans = sorted(set(raw["pairID"]) - set(neg))
    if orphans:
        raise CorruptDataError(f"{NAME}: {where}: pairID(s) {orphans[:5]} have no English row, so their negation "
                               "group cannot be projected; the file is incomplete")
    own = raw["gold_label"].str.strip().str.lower()
    projected = raw["pairID"].map(gold)
    differ = int((own != projected).sum())
    if differ:
        log.warning("%s: %s: %d rows' gold label differs from their English pair's; using the English one",
                    NAME, where, differ)
    ids = projected.map({n: i for i, n in enumerate(LABELS)})
    if ids.isna().any():
        bad = sorted(set(projected[ids.isna()]))[:5]
        raise CorruptDataError(f"{NAME}: {where}: unknown label(s) {bad}; expected {list(LABELS)}")
    return pd.DataFrame({
        "text": raw["sentence1"].astype(str).to_numpy(),
        "text_pair": raw["sentence2"].astype(str).to_numpy(),
        "label": ids.astype(int).to_numpy(),
        "has_negation": raw["pairID"].map(neg).astype(int).to_numpy(),
        "language": raw["language"].map({lang: i for i, lang in enumerate(LANGUAGES)}).astype(int).to_numpy(),
        "pair_id": raw["pairID"].astype(str).to_numpy(),
    })


def _check_archive(archive: Path) -> None:
    from subgroup_robustness.utils.io import sha256_file

    digest = sha256_file(archive)
    expected = SHA256.get(archive.name)
    if expected is None:
        print(f"[{NAME}] downloaded {archive.name}: sha256 {digest}, {archive.stat().st_size:,} bytes (none is "
              f"published; record it in subgroup_robustness/data/sources/xnli.py, SHA256)", flush=True)
    elif digest != expected:
        raise CorruptDataError(f"{NAME}: {archive} is corrupt or altered (sha256 {digest[:12]}…, expected "
                               f"{expected[:12]}…).")


def fetch(cache_dir: Path, url: str = URL) -> Path:
    return cached_fetch(url, cache_dir / "XNLI-1.0", list(TSV_FILES.values()), archive=cache_dir / "XNLI-1.0.zip",
                        what=NAME, how_to_point=HOW_TO_POINT, verify=_check_archive)


def read_xnli(cache_dir: Path, path: str | Path | None, fmt: str, url: str) -> dict[str, pd.DataFrame]:
    """{split: projected rows} for val (dev) and test."""
    if path:
        src = Path(path).expanduser()
        if not src.exists():
            raise DataUnavailableError(f"{NAME}: dataset.source.path={path} does not exist. {HOW_TO_POINT}")
        if src.suffix == ".zip":
            names = list((TSV_FILES if fmt != "jsonl" else JSONL_FILES).values())
            src = extract_once(src, cache_dir, names, NAME)
        folder = folder_of(src)
    else:
        folder = fetch(cache_dir, url)
    fmt = detect_format(folder) if fmt == "auto" else fmt
    out = {}
    for split, part in PARTS.items():
        raw = read_part(folder, part, fmt, cache_dir)
        out[split] = project(raw, str(folder / (TSV_FILES if fmt == "tsv" else JSONL_FILES)[part]))
    return out


# ---- training rows -----------------------------------------------------------------------------------
def multinli_train(settings: Mapping[str, Any] | None, default_cache: Path) -> pd.DataFrame:
    """MultiNLI's training set (English) through the multinli source, all of it as training rows."""
    kw = dict(settings or {})
    kw.setdefault("cache_dir", default_cache)
    kw["val_fraction"] = 0.0  # XNLI dev is the validation split
    kw.pop("metadata_csv", None)
    df = mnli.load(**kw)
    df = df[df["split"] == "train"].reset_index(drop=True)
    df["language"] = LANGUAGES.index("en")
    df["pair_id"] = [f"train-{i}" for i in range(len(df))]
    return df


def _mt_folder(path: Path) -> Path:
    for cand in (path / "XNLI-MT-1.0" / "multinli", path / "multinli", path):
        if cand.is_dir() and any(cand.glob("multinli.train.*.tsv")):
            return cand
    return path


def _read_mt(path: Path, fix: str) -> pd.DataFrame:
    check_fields(path, fix)
    df = read_csv(path, NAME, fix, complete=True, sep="\t", quoting=csv.QUOTE_NONE, dtype=str,
                  keep_default_na=False, encoding="utf-8")
    need = ["premise", "hypo", "label"]
    if [c for c in need if c not in df.columns]:
        raise CorruptDataError(f"{NAME}: {path} needs columns {need} (XNLI-MT-1.0's header); found {list(df.columns)[:6]}")
    short = df[need].isna().any(axis=1)
    if short.any():
        raise corrupt(NAME, path, "the row is short of fields", line=int(np.flatnonzero(short)[0]) + 2, fix=fix)
    return df


def translate_train(cache_dir: Path, mt_path: str | Path | None, mt_url: str, languages: Sequence[str]) -> pd.DataFrame:
    """XNLI-MT's translated training sets, negation projected from the English file row by row."""
    if mt_path:
        src = Path(mt_path).expanduser()
        if not src.exists():
            raise DataUnavailableError(f"{NAME}: dataset.source.mt_path={mt_path} does not exist. {MT_HOW_TO_POINT}")
        if src.suffix == ".zip":
            src = extract_once(src, cache_dir, [f"multinli.train.{lang}.tsv" for lang in sorted({"en", *languages})], NAME)
    else:
        src = cached_fetch(mt_url, cache_dir / "XNLI-MT-1.0", [f"multinli.train.{lang}.tsv" for lang in LANGUAGES],
                           archive=cache_dir / "XNLI-MT-1.0.zip", what=NAME, how_to_point=MT_HOW_TO_POINT,
                           verify=_check_archive)
    folder = _mt_folder(src)

    def read(lang: str) -> pd.DataFrame:
        f = folder / f"multinli.train.{lang}.tsv"
        if not f.exists():
            raise DataUnavailableError(f"{NAME}: missing {f}. {MT_HOW_TO_POINT}")
        return _read_mt(f, fix_for(f, cache_dir))

    en = read("en")
    neg = np.fromiter((int(mnli.has_negation(h)) for h in en["hypo"]), dtype=np.int64, count=len(en))
    frames = []
    for lang in languages:
        rows = en if lang == "en" else read(lang)
        if len(rows) != len(en):
            raise CorruptDataError(f"{NAME}: multinli.train.{lang}.tsv has {len(rows)} rows, the English file "
                                   f"{len(en)}: the translations are aligned by row, so the negation groups cannot "
                                   "be projected")
        gold = en["label"].str.strip().str.lower().map(MT_LABELS)
        if gold.isna().any():
            bad = sorted(set(en["label"][gold.isna()]))[:5]
            raise CorruptDataError(f"{NAME}: multinli.train.en.tsv: unknown label(s) {bad}; expected {sorted(MT_LABELS)}")
        frames.append(pd.DataFrame({
            "text": rows["premise"].to_numpy(), "text_pair": rows["hypo"].to_numpy(),
            "label": gold.map({n: i for i, n in enumerate(LABELS)}).astype(int).to_numpy(),
            "has_negation": neg, "language": LANGUAGES.index(lang),
            "pair_id": [f"train-{i}" for i in range(len(rows))],
        }))
    return pd.concat(frames, ignore_index=True)


def _languages(value: Sequence[str] | None, key: str) -> list[str]:
    if value is None:
        return list(LANGUAGES)
    langs = [value] if isinstance(value, str) else list(value)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown or not langs:
        raise ConfigError(f"{NAME}: dataset.source.{key}={langs}; choose among {list(LANGUAGES)} (null = all)")
    return langs


def load(
    cache_dir: str | Path,
    path: str | Path | None = None,
    format: str = "auto",  # noqa: A002 - the config key users write
    url: str = URL,
    languages: Sequence[str] | None = None,
    train: str = "multinli",
    multinli: Mapping[str, Any] | None = None,  # the multinli source's keys (train=multinli)
    mt_path: str | Path | None = None,
    mt_url: str = MT_URL,
    train_languages: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The normalized table: text, text_pair, label, has_negation, language, pair_id, split."""
    if format not in FORMATS:
        raise ConfigError(f"{NAME}: dataset.source.format={format!r}; choose one of {list(FORMATS)}")
    if train not in TRAIN:
        raise ConfigError(f"{NAME}: dataset.source.train={train!r}; choose one of {list(TRAIN)}")
    cache_dir = Path(cache_dir).expanduser()
    langs = _languages(languages, "languages")
    parts = read_xnli(cache_dir, path, format, url)
    frames = []
    if train == "multinli":
        frames.append(multinli_train(multinli, cache_dir.parent / "multinli").assign(split="train"))
    elif train == "translate_train":
        mt_langs = _languages(train_languages, "train_languages") if train_languages is not None else langs
        frames.append(translate_train(cache_dir, mt_path, mt_url, mt_langs).assign(split="train"))
    keep = [LANGUAGES.index(lang) for lang in langs]
    for split, df in parts.items():
        per_language = df.groupby("language").size()
        off = {LANGUAGES[k]: int(n) for k, n in per_language.items() if n != SIZES[split]}
        if off:
            log.info("%s: the %s split has %s pairs per language (the release has %d)", NAME, split, off, SIZES[split])
        frames.append(df[df["language"].isin(keep)].assign(split=split))
    out = pd.concat(frames, ignore_index=True)
    return out[["text", "text_pair", "label", "has_negation", "language", "pair_id", "split"]]
