"""Small files in the exact official formats of MultiNLI (official jsonl, GLUE TSV, hub rows, the local
premise/hypothesis/label jsonl, group_DRO's metadata CSV), CivilComments-WILDS and FairLex SCOTUS, and a
local HTTP server so the real download code runs against them. Labels follow a keyword, so tiny models
can learn something in a few steps."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import http.server
import io
import json
import random
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from tests.helpers import WORDS

MNLI_LABELS = ("contradiction", "entailment", "neutral")  # group_DRO ids 0, 1, 2
MNLI_KEYWORD = {"contradiction": "hate", "entailment": "love", "neutral": "think"}
NEGATIONS = ("no", "never", "nobody", "nothing")


# ---- MultiNLI ---------------------------------------------------------------------------------------
def mnli_rows(n: int, seed: int, dash_every: int = 0) -> list[dict]:
    """Official-schema records; every ``dash_every``-th has gold_label '-' (no annotator consensus)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        gold = MNLI_LABELS[i % 3]
        premise = " ".join(rng.choices(WORDS, k=8)) + "."
        hyp_words = rng.choices(WORDS[:20], k=5) + [MNLI_KEYWORD[gold]]
        if rng.random() < 0.3:
            hyp_words.insert(rng.randrange(len(hyp_words)), rng.choice(NEGATIONS) + rng.choice(["", ".", ",", "!"]))
        hypothesis = " ".join(hyp_words).capitalize() + "."
        if dash_every and i % dash_every == dash_every - 1:
            gold = "-"
        rows.append({
            "annotator_labels": [gold if gold != "-" else "neutral"], "genre": "fiction", "gold_label": gold,
            "pairID": f"{seed}{i}n", "promptID": str(seed * 100000 + i),
            "sentence1": premise, "sentence1_binary_parse": "( x )", "sentence1_parse": "(ROOT x)",
            "sentence2": hypothesis, "sentence2_binary_parse": "( y )", "sentence2_parse": "(ROOT y)",
        })
    return rows


def mnli_parts(n_train: int = 150, n_dev: int = 60) -> dict[str, list[dict]]:
    return {"train": mnli_rows(n_train, 1), "dev_matched": mnli_rows(n_dev, 2, dash_every=9),
            "dev_mismatched": mnli_rows(n_dev, 3, dash_every=7)}


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def write_mnli_official(folder: Path, parts: dict[str, list[dict]]) -> Path:
    for part, rows in parts.items():
        write_jsonl(folder / f"multinli_1.0_{part}.jsonl", rows)
    return folder


def zip_mnli_official(dest: Path, parts: dict[str, list[dict]]) -> Path:
    """Laid out like the real multinli_1.0.zip: a multinli_1.0/ folder plus macOS resource-fork entries."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for part, rows in parts.items():
            zf.writestr(f"multinli_1.0/multinli_1.0_{part}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            zf.writestr(f"__MACOSX/multinli_1.0/._multinli_1.0_{part}.jsonl", b"\x00\x05\x16\x07")
    return dest


GLUE_TRAIN_COLS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
GLUE_DEV_COLS = GLUE_TRAIN_COLS[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def write_mnli_glue(folder: Path, parts: dict[str, list[dict]]) -> Path:
    """GLUE's MNLI TSVs: no quoting at all (sentences keep raw quotes); GLUE already dropped the '-' rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        cols = GLUE_TRAIN_COLS if part == "train" else GLUE_DEV_COLS
        lines = ["\t".join(cols)]
        for i, r in enumerate(x for x in rows if x["gold_label"] != "-"):
            vals = {"index": str(i), "promptID": r["promptID"], "pairID": r["pairID"], "genre": r["genre"],
                    "sentence1_binary_parse": r["sentence1_binary_parse"], "sentence2_binary_parse": r["sentence2_binary_parse"],
                    "sentence1_parse": r["sentence1_parse"], "sentence2_parse": r["sentence2_parse"],
                    "sentence1": r["sentence1"], "sentence2": r["sentence2"], "gold_label": r["gold_label"]}
            for k in ("label1", "label2", "label3", "label4", "label5"):
                vals[k] = r["gold_label"]
            lines.append("\t".join(vals[c] for c in cols))
        (folder / f"{part}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_mnli_local_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    """The ../shared/data/multinli/dev_matched.jsonl layout: premise, hypothesis, label strings, no '-'."""
    return write_jsonl(path, [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": r["gold_label"]}
                              for r in rows if r["gold_label"] != "-"])


def mnli_hub_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """nyu-mll/multi_nli rows: premise, hypothesis, label as the hub's ClassLabel id (entailment=0, neutral=1,
    contradiction=2); -1 where there is no gold label."""
    hub = {"entailment": 0, "neutral": 1, "contradiction": 2, "-": -1}
    return pd.DataFrame({"promptID": [int(r["promptID"]) for r in rows], "pairID": [r["pairID"] for r in rows],
                         "premise": [r["sentence1"] for r in rows], "hypothesis": [r["sentence2"] for r in rows],
                         "genre": [r["genre"] for r in rows], "label": [hub[r["gold_label"]] for r in rows]})


def write_group_dro_metadata(path: Path, parts: dict[str, list[dict]], seed: int = 0) -> pd.DataFrame:
    """group_DRO's generate_multinli.py: concat train/dev_matched/dev_mismatched, random 50/20/30 split,
    drop '-', write gold_label/sentence2_has_negation/split with the original row index."""
    from subgroup_robustness.data.sources.multinli import has_negation

    rows = [r for p in ("train", "dev_matched", "dev_mismatched") for r in parts[p]]
    df = pd.DataFrame({"gold_label": [r["gold_label"] for r in rows], "sentence2": [r["sentence2"] for r in rows]})
    n = len(df)
    n_val, n_test = int(0.2 * n), int(0.3 * n)
    splits = np.array([0] * (n - n_val - n_test) + [1] * n_val + [2] * n_test)
    np.random.default_rng(seed).shuffle(splits)
    df["split"] = splits
    df = df[df["gold_label"] != "-"].copy()
    df["gold_label"] = df["gold_label"].map({n: i for i, n in enumerate(MNLI_LABELS)})
    df["sentence2_has_negation"] = [int(has_negation(s)) for s in df["sentence2"]]
    out = df[["gold_label", "sentence2_has_negation", "split"]]
    out.to_csv(path)
    return out


# ---- CivilComments-WILDS ----------------------------------------------------------------------------
WILDS_COLUMNS = [
    "", "id", "comment_text", "split", "created_date", "publication_id", "parent_id", "article_id", "rating",
    "funny", "wow", "sad", "likes", "disagree", "toxicity", "severe_toxicity", "obscene", "sexual_explicit",
    "identity_attack", "insult", "threat", "male", "female", "transgender", "other_gender", "heterosexual",
    "homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "LGBTQ", "christian", "jewish", "muslim",
    "hindu", "buddhist", "atheist", "other_religion", "other_religions", "black", "white", "asian", "latino",
    "other_race_or_ethnicity", "physical_disability", "intellectual_or_learning_disability",
    "psychiatric_or_mental_illness", "other_disability", "identity_any",
]
IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")


def wilds_row(i: int, text: str, split: str, toxicity: float, identities: dict[str, object] | None = None) -> dict:
    """One all_data_with_identities.csv row; identities not given are 0.0 and identity_any follows them."""
    identities = dict(identities or {})
    row = {c: "0.0" for c in WILDS_COLUMNS}
    row.update({"": str(i), "id": str(239000 + i), "comment_text": text, "split": split,
                "created_date": "2017-03-06 15:21:53.675241+00", "publication_id": "21", "parent_id": "",
                "article_id": str(317000 + i), "rating": "approved", "funny": "0", "wow": "0", "sad": "0",
                "likes": "2", "disagree": "0", "toxicity": repr(float(toxicity))})
    for k, v in identities.items():
        row[k] = "" if v is None else repr(float(v))
    any_val = max([float(v) for v in identities.values() if v not in (None, "")] or [0.0])
    row["identity_any"] = repr(any_val)
    return row


def civil_rows(n: int = 180, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        split = "train" if i % 10 < 6 else ("val" if i % 10 < 8 else "test")
        toxic = rng.random() < 0.4
        ids = {}
        if rng.random() < 0.6:
            for ident in rng.sample(IDENTITIES, k=rng.choice([1, 1, 2])):
                ids[ident] = rng.choice([0.5, 0.7, 1.0])
        words = rng.choices(WORDS, k=8) + ["stupid hate" if toxic else "kind love"] + [w.lower() for w in ids]
        rows.append(wilds_row(i, " ".join(words), split, rng.choice([0.5, 0.8, 0.9]) if toxic else rng.choice([0.0, 0.2, 0.4999]), ids))
    return rows


def write_wilds_csv(path: Path, rows: Sequence[dict]) -> Path:
    """pandas' to_csv style, as WILDS wrote it: minimal quoting, '\\n' line ends, an unnamed index column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=WILDS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def tar_gz(dest: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return dest


# ---- FairLex SCOTUS ---------------------------------------------------------------------------------
# FairLex's own spelling, written out here as the release has it (the source spells them snake_case)
FAIRLEX_ISSUE_AREAS = ("Criminal Procedure", "Civil Rights", "First Amendment", "Due Process", "Privacy", "Attorneys",
                       "Unions", "Economic Activity", "Judicial Power", "Federalism", "Federal Taxation")
FAIRLEX_ATTRIBUTES = {"decision_direction": ("conservative", "liberal"),
                      "respondent_type": ("other", "person", "organization", "public entity", "facility")}


def scotus_rows(n: int, seed: int, names: bool = False) -> list[dict]:
    """FairLex release records: text, label, attributes{decision_direction, respondent_type}; ids or names."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % len(FAIRLEX_ISSUE_AREAS)
        dd, rt = rng.randrange(2), rng.randrange(5)
        text = " ".join(rng.choices(WORDS, k=30)) + f" issue{label} " + " ".join(rng.choices(WORDS, k=10))
        if names:
            rows.append({"text": text, "label": FAIRLEX_ISSUE_AREAS[label],
                         "attributes": {"decision_direction": FAIRLEX_ATTRIBUTES["decision_direction"][dd],
                                        "respondent_type": FAIRLEX_ATTRIBUTES["respondent_type"][rt]}})
        else:
            rows.append({"text": text, "label": label, "attributes": {"decision_direction": dd, "respondent_type": rt}})
    return rows


def scotus_parts(names: bool = False) -> dict[str, list[dict]]:
    return {"train": scotus_rows(110, 1, names), "val": scotus_rows(44, 2, names), "test": scotus_rows(44, 3, names)}


def write_fairlex(folder: Path, parts: dict[str, list[dict]]) -> Path:
    for split, rows in parts.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def zip_fairlex(dest: Path, parts: dict[str, list[dict]]) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, rows in parts.items():
            zf.writestr(f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return dest


# ---- plumbing ---------------------------------------------------------------------------------------
def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A local HTTP server for ``folder``: the real download code runs against fixture archives."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# a port nothing listens on: the download fails at once, as it does offline
UNREACHABLE = "http://127.0.0.1:9"


def run_overrides(model_dir: Path, out_dir: Path, dataset: str, *extra: str) -> list[str]:
    """A seconds-long run on any dataset: tiny BERT, one short epoch, no loggers."""
    return ["model=local", f"model.path={model_dir}", f"dataset={dataset}", "dataset.max_length=64",
            "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none", "print_config=false",
            "callbacks.progress=null", f"hydra.run.dir={out_dir}", *extra]
