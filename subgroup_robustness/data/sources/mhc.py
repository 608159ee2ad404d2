"""Multilingual HateCheck (Röttger et al., WOAH 2022; CC BY 4.0): functional tests for hate speech detection
in 10 languages, **evaluation only** (every row is in the test split; use it through ``eval_datasets=[mhc]``
on a run trained on a hate-speech or toxicity dataset with the same two labels, non-hateful=0, hateful=1).

Files: ``MHC Final Cases/hatecheck_cases_final_<language>.csv`` (UTF-8, comma-separated, quoted where
needed), one per language. Columns used: ``test_case`` (text), ``label_gold`` (hateful / non-hateful),
``target_ident`` (the targeted protected group, empty where there is none), ``functionality`` and
``disagreement_in_template``. The column sets differ by language: gender-inflected languages add
``gender_male``/``gender_female`` (and leave ``case_templ`` empty where they apply); Dutch and Mandarin
have neither; none of these columns is read.

Attributes: ``target`` (the identities of all languages, normalised: FairLex-style snake_case, "Jews"/"jews"/
"jewish people" = jews, "immigrant" = immigrants; ``no_target`` = empty ``target_ident``), ``language`` (ISO
codes), ``functionality`` (HateCheck's 34 functionalities; each language tests 27, Mandarin 25).
Groups (conf/dataset/mhc.yaml) = target identity x label per language.

With no ``path`` each language's CSV is downloaded once from the GitHub repository and checked against
the sha256 recorded here (computed from the files of commit a03f2ca, 2022-05-23).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.data.sources.fetch import download_url
from subgroup_robustness.data.sources.files import REPLACE, extract_once, fix_for, read_csv, verify_sha256
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError
from subgroup_robustness.utils.io import file_lock

NAME = "mhc"
# file language -> ISO 639-1 code (the `language` attribute; XNLI and FSCS use the same codes)
FILE_LANGUAGES = {"arabic": "ar", "dutch": "nl", "french": "fr", "german": "de", "hindi": "hi", "italian": "it",
                  "mandarin": "zh", "polish": "pl", "portuguese": "pt", "spanish": "es"}
LANGUAGES = tuple(FILE_LANGUAGES.values())
LABELS = ("non_hateful", "hateful")
TARGETS = ("no_target", "women", "trans_people", "gay_people", "black_people", "disabled_people", "jews", "muslims",
           "immigrants", "refugees", "foreigners", "indigenous_people", "asian_people", "lower_caste",
           "north_east_indians")
FUNCTIONALITIES = (
    "derog_neg_emote_h", "derog_neg_attrib_h", "derog_dehum_h", "derog_impl_h", "threat_dir_h", "threat_norm_h",
    "slur_h", "profanity_h", "profanity_nh", "ref_subs_clause_h", "ref_subs_sent_h", "negate_pos_h",
    "negate_neg_nh", "phrase_question_h", "phrase_opinion_h", "ident_neutral_nh", "ident_pos_nh",
    "counter_quote_nh", "counter_ref_nh", "target_obj_nh", "target_indiv_nh", "target_group_nh",
    "spell_char_swap_h", "spell_char_del_h", "spell_space_del_h", "spell_space_add_h", "spell_leet_h",
    "spell_char_comp_h", "spell_char_eng_replace_h", "spell_char_repeat_h", "spell_homoph_h", "spell_pinyin_h",
    "spell_sent_arabazi_h", "spell_word_variation_h",
)
# the vocabulary (conf/dataset/mhc.yaml reads it through ${sr.vocab:mhc,...})
ATTRIBUTES = {"target": TARGETS, "language": LANGUAGES, "functionality": FUNCTIONALITIES}
MISSING = {"target": ("no_target",)}  # not a target identity: left out of the target groupings
LANGUAGE = "language"
# spellings in the files that name the same identity (after lower-casing and snake_casing)
TARGET_ALIASES = {"jewish_people": "jews", "immigrant": "immigrants", "north_east_indian": "north_east_indians",
                  "": "no_target"}
COLUMNS = ("functionality", "test_case", "label_gold", "target_ident", "disagreement_in_template")
FOLDER = "MHC Final Cases"
BASE_URL = "https://raw.githubusercontent.com/rewire-online/multilingual-hatecheck/main/MHC%20Final%20Cases"
# sha256, bytes and test cases of each file (computed from the repository's files at commit a03f2ca)
RELEASE = {
    "arabic": ("134d39c3b691801e24ab53fb14d3214fea69eb2b3c5288b3f00e31ca0ece1bee", 883478, 3570),
    "dutch": ("df67042194bf33837e77126aa994e01201d84edec8f0b46acec8fed0322d595d", 851675, 3765),
    "french": ("17cc2c7ec01ad28c31c1c53bbda8c7245b83e86d34017327964956ace1446586", 980335, 3718),
    "german": ("ecdef4611b877120d0a8feec9c0cd0dfc1efec7ead4bbd62eaf32f6cc80d2ee0", 883538, 3645),
    "hindi": ("ffebc31db02d59f603ac9728aa9b63d7db46de2cdc4c54468aabab82e5d8bd40", 858507, 3565),
    "italian": ("5339cd1e0d6e338c7ae9b831e74d653d6216a25120214d92b5d98d25a1c20674", 1061166, 3690),
    "mandarin": ("d094336d73fb3b2817a04cac226687fcf91cb914deccd4d4096a85cf4a147414", 718614, 3378),
    "polish": ("88b8f9cfe4484f2e7543a7b28983b10f5942f04cc87c904c653a01318b7d1c04", 967539, 3815),
    "portuguese": ("839bcd08e59efb9a659ab3c7e82022844a57ae5babe705323a7956d2d9461ea8", 996703, 3691),
    "spanish": ("20d2388f4f3bafe744010a42f1ce7ddd5b2b09efa978fb0d8a0fc810487948aa", 1067712, 3745),
}

HOW_TO_POINT = (
    "Set dataset.source.path to a folder holding MHC's 'MHC Final Cases/hatecheck_cases_final_<language>.csv' "
    "files (a clone or the zip of github.com/rewire-online/multilingual-hatecheck)."
)


def file_name(language: str) -> str:
    return f"hatecheck_cases_final_{language}.csv"


def _snake(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.strip().lower()).strip("_")


def target_code(value: str, where: str) -> int:
    key = _snake(value)
    key = TARGET_ALIASES.get(key, key)
    if key not in TARGETS:
        raise CorruptDataError(f"{NAME}: {where}: unknown target_ident {value!r}; the known identities are "
                               f"{list(TARGETS[1:])} (add a spelling to mhc.TARGET_ALIASES)")
    return TARGETS.index(key)


def read_language(path: Path, language: str, fix: str = REPLACE) -> pd.DataFrame:
    """One language's file as table rows (all in the test split)."""
    df = read_csv(path, NAME, fix, complete=True, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise CorruptDataError(f"{NAME}: {path} has no column(s) {missing}; found {list(df.columns)[:8]} "
                               "(is it an MHC 'final cases' file?)")
    labels = df["label_gold"].str.strip().str.lower().map({"non-hateful": 0, "hateful": 1})
    if labels.isna().any():
        i = int(np.flatnonzero(labels.isna().to_numpy())[0])
        raise CorruptDataError(f"{NAME}: {path}, line {i + 2}: label_gold is {df['label_gold'].iloc[i]!r}; "
                               "expected hateful or non-hateful")
    func = df["functionality"].str.strip().map({f: k for k, f in enumerate(FUNCTIONALITIES)})
    if func.isna().any():
        i = int(np.flatnonzero(func.isna().to_numpy())[0])
        raise CorruptDataError(f"{NAME}: {path}, line {i + 2}: unknown functionality {df['functionality'].iloc[i]!r}")
    targets = [target_code(v, f"{path}, line {i + 2}") for i, v in enumerate(df["target_ident"])]
    return pd.DataFrame({
        "text": df["test_case"].to_numpy(),
        "label": labels.astype(int).to_numpy(),
        "target": np.asarray(targets, dtype=np.int64),
        "language": LANGUAGES.index(FILE_LANGUAGES[language]),
        "functionality": func.astype(int).to_numpy(),
        "disagreement": df["disagreement_in_template"].str.strip().str.lower().eq("true").to_numpy(),
        "case_id": (df["mhc_case_id"].to_numpy() if "mhc_case_id" in df.columns
                    else [f"{language}-{i + 1}" for i in range(len(df))]),
    })


def _folder(path: Path) -> Path:
    for cand in (path / FOLDER, *sorted(path.glob(f"*/{FOLDER}")), path):
        if cand.is_dir() and any(cand.glob("hatecheck_cases_final_*.csv")):
            return cand
    return path


def fetch(cache_dir: Path, languages: Sequence[str], base_url: str = BASE_URL) -> Path:
    """Each language's CSV downloaded once into the cache, checked against its recorded sha256."""
    folder = cache_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for lang in languages:
        dest = folder / file_name(lang)
        if dest.exists():
            continue
        with file_lock(cache_dir / f".{NAME}.lock"):
            if dest.exists():
                continue
            url = f"{base_url}/{file_name(lang)}"
            download_url(url, dest, what=NAME, advice=f"{HOW_TO_POINT} Or place {file_name(lang)} in {folder}.")
            expected = RELEASE.get(lang, (None,))[0]
            try:
                verify_sha256(dest, expected, NAME, "It was removed; run again to download it afresh.")
            except CorruptDataError:
                dest.unlink(missing_ok=True)
                raise
    return folder


def load(
    cache_dir: str | Path,
    path: str | Path | None = None,
    languages: Sequence[str] | None = None,
    exclude_disagreement: bool = False,
    base_url: str = BASE_URL,
) -> pd.DataFrame:
    """The normalized table: text, label, target, language, functionality, split (= test)."""
    cache_dir = Path(cache_dir).expanduser()
    by_code = {c: f for f, c in FILE_LANGUAGES.items()}
    langs = list(FILE_LANGUAGES) if languages is None else [by_code.get(v, v) for v in
                                                              ([languages] if isinstance(languages, str) else languages)]
    unknown = [v for v in langs if v not in FILE_LANGUAGES]
    if unknown or not langs:
        raise ConfigError(f"{NAME}: dataset.source.languages={list(languages or [])}; choose among "
                          f"{list(LANGUAGES)} (or their names {list(FILE_LANGUAGES)}; null = all)")
    if path:
        src = Path(path).expanduser()
        if not src.exists():
            raise DataUnavailableError(f"{NAME}: dataset.source.path={path} does not exist. {HOW_TO_POINT}")
        if src.suffix == ".zip":
            src = extract_once(src, cache_dir, [file_name(lang) for lang in langs], NAME)
        folder = _folder(src)
    else:
        folder = fetch(cache_dir, langs, base_url)
    frames = []
    for lang in langs:
        f = folder / file_name(lang)
        if not f.exists():
            raise DataUnavailableError(f"{NAME}: missing {f}. {HOW_TO_POINT}")
        frames.append(read_language(f, lang, fix_for(f, cache_dir)))
    df = pd.concat(frames, ignore_index=True)
    if exclude_disagreement:  # MHC's README: drop whole templates where annotators disagreed with the gold label
        df = df[~df["disagreement"]].reset_index(drop=True)
    df["split"] = "test"
    return df.drop(columns=["disagreement"])
