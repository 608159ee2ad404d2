"""Small files in the official formats of FairLex FSCS/CAIL/ECtHR (release jsonl in the zip layout), XNLI-1.0
(xnli.dev/test.tsv and .jsonl), XNLI-MT-1.0 (multinli.train.<lang>.tsv) and Multilingual HateCheck (one CSV
per language, with the per-language column differences). Labels follow keywords, so tiny models can learn
something in a few steps. Translations are simulated: a "translated" sentence is the English one with every
word reversed and a language tag, so no English negation word survives in it."""

from __future__ import annotations

import csv
import json
import random
import zipfile
from pathlib import Path
from typing import Sequence

from tests.helpers import WORDS

# ---- FairLex: FairLex's own spellings (the release's ClassLabel names), in id order -----------------------
FSCS_RELEASE = {
    "labels": ("dismissal", "approval"),
    "decision_language": ("de", "fr", "it"),
    "legal_area": ("other", "public law", "penal law", "civil law", "social law", "insurance law"),
    "court_region": ("n/a", "Région lémanique", "Zürich", "Espace Mittelland", "Northwestern Switzerland",
                     "Eastern Switzerland", "Central Switzerland", "Ticino", "Federation"),
}
CAIL_RELEASE = {
    "labels": ("0", "<=12", "<=36", "<=60", "<=120", ">120"),
    "defendant_gender": ("male", "female"),
    "court_region": ("Beijing", "Liaoning", "Hunan", "Guangdong", "Sichuan", "Guangxi", "Zhejiang"),
}
ECTHR_RELEASE = {
    "labels": ("2", "3", "5", "6", "8", "9", "10", "11", "14", "P1-1"),
    "applicant_age": ("n/a", "<=35", "<=65", ">65"),
    "applicant_gender": ("n/a", "male", "female"),
    "defendant_state": ("C.E. European", "Rest of Europe"),
}


def _attrs(release: dict, rng: random.Random, names: bool) -> dict:
    out = {}
    for attr, values in release.items():
        if attr == "labels":
            continue
        k = rng.randrange(len(values))
        out[attr] = values[k] if names else k
    return out


def fairlex_rows(release: dict, n: int, seed: int, names: bool = False) -> list[dict]:
    """Single-label FairLex records (FSCS, CAIL): text, label, attributes{...}; ids or FairLex's names."""
    rng = random.Random(seed)
    labels = release["labels"]
    rows = []
    for i in range(n):
        label = i % len(labels)
        text = " ".join(rng.choices(WORDS, k=25)) + f" verdict{label} " + " ".join(rng.choices(WORDS, k=5))
        rows.append({"text": text, "label": labels[label] if names else label, "attributes": _attrs(release, rng, names)})
    return rows


def ecthr_rows(n: int, seed: int, names: bool = False) -> list[dict]:
    """Multi-label ECtHR records: ``labels`` = a list of violated articles (ids or names), every 5th empty."""
    rng = random.Random(seed)
    articles = ECTHR_RELEASE["labels"]
    rows = []
    for i in range(n):
        chosen = [] if i % 5 == 0 else sorted(rng.sample(range(len(articles)), k=rng.choice([1, 1, 2, 3])))
        words = rng.choices(WORDS, k=20) + [f"article{k}" for k in chosen] + (["dismissed"] if not chosen else [])
        rows.append({"text": " ".join(words), "labels": [articles[k] if names else k for k in chosen],
                     "attributes": _attrs(ECTHR_RELEASE, rng, names)})
    return rows


def fairlex_parts(kind: str, names: bool = False, sizes: tuple[int, int, int] = (90, 36, 36)) -> dict[str, list[dict]]:
    if kind == "ecthr":
        make = lambda n, s: ecthr_rows(n, s, names)  # noqa: E731
    else:
        release = {"fscs": FSCS_RELEASE, "cail": CAIL_RELEASE}[kind]
        make = lambda n, s: fairlex_rows(release, n, s, names)  # noqa: E731
    return {"train": make(sizes[0], 1), "val": make(sizes[1], 2), "test": make(sizes[2], 3)}


# ---- XNLI ---------------------------------------------------------------------------------------------------
XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
XNLI_TSV_COLUMNS = ["language", "gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
                    "sentence2_parse", "sentence1", "sentence2", "promptID", "pairID", "genre", "label1", "label2",
                    "label3", "label4", "label5", "sentence1_tokenized", "sentence2_tokenized", "match"]
NLI_KEYWORD = {"contradiction": "hate", "entailment": "love", "neutral": "think"}
NLI_LABELS = ("contradiction", "entailment", "neutral")


def translate(sentence: str, lang: str) -> str:
    """A stand-in translation: every word reversed (``never`` -> ``reven``), tagged with the language."""
    if lang == "en":
        return sentence
    return f"{lang}: " + " ".join(w[::-1] for w in sentence.split(" "))


def xnli_pairs(n: int, seed: int, never_every: int = 4) -> list[dict]:
    """English pairs; every ``never_every``-th hypothesis says "never" (group_DRO's negation)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gold = NLI_LABELS[i % 3]
        words = rng.choices(WORDS[:20], k=5) + [NLI_KEYWORD[gold]]
        words = [w for w in words if w not in ("no", "never")]
        if never_every and i % never_every == 1:
            words.insert(2, "never")
        out.append({"pairID": str(seed * 1000 + i + 1), "promptID": str(seed * 1000 + i // 3 + 1), "gold": gold,
                    "premise": " ".join(rng.choices(WORDS, k=8)) + ".", "hypothesis": " ".join(words).capitalize() + "."})
    return out


def xnli_rows(pairs: Sequence[dict], languages: Sequence[str] = XNLI_LANGUAGES) -> list[dict]:
    """One row per pair and language, grouped by language as in the release."""
    rows = []
    for lang in languages:
        for p in pairs:
            s1, s2 = translate(p["premise"], lang), translate(p["hypothesis"], lang)
            rows.append({"language": lang, "gold_label": p["gold"], "sentence1_binary_parse": "",
                         "sentence2_binary_parse": "", "sentence1_parse": "", "sentence2_parse": "",
                         "sentence1": s1, "sentence2": s2, "promptID": p["promptID"], "pairID": p["pairID"],
                         "genre": "facetoface", **{f"label{k}": p["gold"] for k in range(1, 6)},
                         "sentence1_tokenized": s1, "sentence2_tokenized": s2, "match": "True"})
    return rows


def write_xnli_tsv(path: Path, rows: Sequence[dict]) -> Path:
    """XNLI's TSV: a header, tab-separated, no quoting at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(XNLI_TSV_COLUMNS)] + ["\t".join(r[c] for c in XNLI_TSV_COLUMNS) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_xnli_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"annotator_labels": [r[f"label{k}"] for k in range(1, 6)], "genre": r["genre"],
                                 "gold_label": r["gold_label"], "language": r["language"], "match": r["match"],
                                 "pairID": r["pairID"], "promptID": r["promptID"], "sentence1": r["sentence1"],
                                 "sentence1_tokenized": r["sentence1_tokenized"], "sentence2": r["sentence2"],
                                 "sentence2_tokenized": r["sentence2_tokenized"]}) + "\n")
    return path


def xnli_parts(n_dev: int = 24, n_test: int = 30, languages: Sequence[str] = XNLI_LANGUAGES) -> dict[str, list[dict]]:
    return {"dev": xnli_rows(xnli_pairs(n_dev, 1), languages), "test": xnli_rows(xnli_pairs(n_test, 2), languages)}


def write_xnli(root: Path, parts: dict[str, list[dict]], fmt: str = "tsv") -> Path:
    """The zip's layout: ``XNLI-1.0/xnli.{dev,test}.{tsv,jsonl}`` under ``root``."""
    for part, rows in parts.items():
        f = root / "XNLI-1.0" / f"xnli.{part}.{fmt}"
        (write_xnli_tsv if fmt == "tsv" else write_xnli_jsonl)(f, rows)
    return root


def zip_xnli(dest: Path, parts: dict[str, list[dict]]) -> Path:
    tmp = dest.parent / (dest.stem + "_src")
    write_xnli(tmp, parts, "tsv")
    write_xnli(tmp, parts, "jsonl")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((tmp / "XNLI-1.0").iterdir()):
            zf.write(f, f"XNLI-1.0/{f.name}")
        zf.writestr("__MACOSX/XNLI-1.0/._xnli.dev.tsv", b"\x00\x05\x16\x07")
    return dest


def write_xnli_mt(root: Path, n: int, languages: Sequence[str], seed: int = 5) -> Path:
    """XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv: premise, hypo, label ('contradictory'), line-aligned."""
    folder = root / "XNLI-MT-1.0" / "multinli"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = xnli_pairs(n, seed)
    for lang in languages:
        lines = ["premise\thypo\tlabel"]
        for p in pairs:
            label = "contradictory" if p["gold"] == "contradiction" else p["gold"]
            lines.append(f"{translate(p['premise'], lang)}\t{translate(p['hypothesis'], lang)}\t{label}")
        (folder / f"multinli.train.{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ---- Multilingual HateCheck ----------------------------------------------------------------------------------
MHC_BASE_COLUMNS = ["mhc_case_id", "functionality", "test_case", "label_gold", "target_ident", "ref_case_id",
                    "ref_templ_id", "templ_id", "case_templ"]
MHC_GENDER_COLUMNS = ["gender_male", "gender_female"]
MHC_TAIL_COLUMNS = ["label_annotated", "label_annotated_maj", "disagreement_in_case", "disagreement_in_template"]
# the files' own spellings, per language (inconsistent casing and number, as in the release)
MHC_TARGETS = {
    "german": ["women", "trans people", "gay people", "black people", "disabled people", "jews", "refugees"],
    "hindi": ["women", "trans people", "gay people", "Muslims", "Lower Caste", "North-East Indians", "Black people"],
    "mandarin": ["women", "trans people", "gay people", "black people", "disabled people", "Muslims", "foreigners"],
    "arabic": ["women", "trans people", "gay people", "black people", "disabled people", "Jews", "immigrants"],
    "polish": ["women", "trans people", "gay people", "asian people", "disabled people", "jewish people", "immigrant",
               "immigrants"],
    "dutch": ["women", "trans people", "gay people", "black people", "disabled people", "Muslims", "immigrants"],
}
MHC_GENDERED = {"german", "hindi", "arabic", "polish"}  # these files carry gender_male/gender_female
MHC_FUNCS = (("derog_neg_emote_h", "hateful"), ("ident_neutral_nh", "non-hateful"), ("slur_h", "hateful"),
             ("target_obj_nh", "non-hateful"), ("profanity_nh", "non-hateful"))


def mhc_rows(language: str, n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(sum(map(ord, language)) + seed)
    targets = MHC_TARGETS[language]
    rows = []
    for i in range(n):
        func, gold = MHC_FUNCS[i % len(MHC_FUNCS)]
        no_target = func in ("target_obj_nh", "profanity_nh")
        target = "" if no_target else targets[i % len(targets)]
        text = f"{language[:2]} " + " ".join(rng.choices(WORDS, k=6)) + (" hate" if gold == "hateful" else " love")
        if i % 7 == 3:
            text += ', "quoted", with commas'
        ann = [gold, gold, "non-hateful" if i % 9 == 0 else gold]
        maj = max(set(ann), key=ann.count)
        row = {"mhc_case_id": f"{language}-{i + 1}", "functionality": func, "test_case": text, "label_gold": gold,
               "target_ident": target, "ref_case_id": "" if i < 5 else str(i - 4), "ref_templ_id": "",
               "templ_id": str(i // 3 + 1), "case_templ": "" if (language in MHC_GENDERED and i % 4 == 0) else "[IDENT_P] x.",
               "label_annotated": str(ann), "label_annotated_maj": maj, "disagreement_in_case": str(maj != gold),
               "disagreement_in_template": str(i % 10 == 0)}
        if language in MHC_GENDERED:
            row["gender_male"] = "[male_IDENT_P] x." if i % 4 == 0 else ""
            row["gender_female"] = "[female_IDENT_P] x." if i % 4 == 0 else ""
        rows.append(row)
    return rows


def write_mhc(root: Path, languages: Sequence[str] = ("german", "hindi", "mandarin"), n: int = 40) -> Path:
    """``root/MHC Final Cases/hatecheck_cases_final_<language>.csv``, pandas-style CSV (minimal quoting)."""
    folder = root / "MHC Final Cases"
    folder.mkdir(parents=True, exist_ok=True)
    for lang in languages:
        cols = MHC_BASE_COLUMNS + (MHC_GENDER_COLUMNS if lang in MHC_GENDERED else []) + MHC_TAIL_COLUMNS
        with open(folder / f"hatecheck_cases_final_{lang}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            writer.writeheader()
            writer.writerows(mhc_rows(lang, n))
    return root
