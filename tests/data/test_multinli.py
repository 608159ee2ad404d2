"""MultiNLI: group_DRO's negation attribute, every source format, the three split schemes, the binary
variants, downloads, and clear failures offline or on broken files."""

from __future__ import annotations

import json
import string
import sys
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from subgroup_robustness.data.sources import multinli
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError
from tests.data.fixtures import (
    MNLI_LABELS, UNREACHABLE, md5, mnli_hub_frame, mnli_parts, serve, write_group_dro_metadata,
    write_mnli_glue, write_mnli_local_jsonl, write_mnli_official, zip_mnli_official,
)
from tests.helpers import REPO, compose, run_cli

SHARED_DEV = REPO.parent / "shared" / "data" / "multinli" / "dev_matched.jsonl"


@pytest.mark.parametrize("sentence,expected", [
    ("No one is here.", True),
    ("nobody came", True),
    ("I have NEVER been there", True),
    ("There is nothing!", True),
    ("No.", True),                          # punctuation is stripped before matching
    ('He said "no"', True),
    ("  two  spaces  no  ", True),          # empty tokens from double spaces are harmless
    ("It is not raining", False),           # `not` is not one of the four words
    ("Knowledge is power", False),          # words inside other words do not count
    ("The snow is nowhere", False),
    ("He is a nobody's fool", False),       # the apostrophe is removed: "nobodys"
    ("no-one came", False),                 # the hyphen is removed: "noone"
    ("he said:no", False),                  # punctuation is deleted, not replaced by a space: "saidno"
    ("no\tway", False),                     # group_DRO splits on single spaces only
    ("\u201cNo\u201d", False),              # curly quotes are not in string.punctuation
    ("Don't", False),
    ("", False),
    (None, False),
])
def test_negation_follows_group_dro_tokenization(sentence, expected):
    assert multinli.has_negation(sentence) is expected


def _expected(rows):
    """Label ids and negation flags computed here, independently of the loader."""
    table = str.maketrans("", "", string.punctuation)
    keep = [r for r in rows if r["gold_label"] != "-"]
    labels = [MNLI_LABELS.index(r["gold_label"]) for r in keep]
    neg = [int(any(w in ("nobody", "no", "never", "nothing") for w in r["sentence2"].translate(table).lower().split(" ")))
           for r in keep]
    return keep, labels, neg


def test_official_folder_splits_train_and_uses_dev_matched_as_test(tmp_path):
    parts = mnli_parts()
    folder = write_mnli_official(tmp_path / "mnli", parts)
    df = multinli.load(tmp_path / "cache", path=folder, val_fraction=0.2)
    assert list(df.columns) == ["text", "text_pair", "label", "has_negation", "split"]
    train_keep, train_labels, train_neg = _expected(parts["train"])
    dev_keep, dev_labels, dev_neg = _expected(parts["dev_matched"])
    test = df[df["split"] == "test"]
    assert test["text"].tolist() == [r["sentence1"] for r in dev_keep]  # the '-' rows are gone
    assert test["text_pair"].tolist() == [r["sentence2"] for r in dev_keep]
    assert test["label"].tolist() == dev_labels and test["has_negation"].tolist() == dev_neg
    trval = df[df["split"] != "test"]
    assert trval["label"].tolist() == train_labels and trval["has_negation"].tolist() == train_neg
    # the validation share is carved per group
    for (label, neg), part in trval.groupby(["label", "has_negation"]):
        assert (part["split"] == "val").sum() == round(0.2 * len(part)), (label, neg)
    again = multinli.load(tmp_path / "cache", path=folder, val_fraction=0.2)
    other = multinli.load(tmp_path / "cache", path=folder, val_fraction=0.2, split_seed=1)
    assert again["split"].tolist() == df["split"].tolist()
    assert other["split"].tolist() != df["split"].tolist()


def test_zip_glue_and_official_give_the_same_table(tmp_path):
    parts = mnli_parts()
    parts["train"][0]["sentence2"] = 'He said "no" to the "deal".'  # raw quotes: GLUE files are unquoted
    official = multinli.load(tmp_path / "c", path=write_mnli_official(tmp_path / "o", parts))
    from_zip = multinli.load(tmp_path / "c", path=zip_mnli_official(tmp_path / "multinli_1.0.zip", parts))
    glue = multinli.load(tmp_path / "c", path=write_mnli_glue(tmp_path / "glue", parts))
    pd.testing.assert_frame_equal(official, from_zip)
    pd.testing.assert_frame_equal(official, glue)
    assert official.loc[0, "text_pair"] == 'He said "no" to the "deal".' and official.loc[0, "has_negation"] == 1


def test_single_jsonl_file_is_split_by_group(tmp_path):
    rows = [r for part in mnli_parts(300, 0).values() for r in part]
    path = write_mnli_local_jsonl(tmp_path / "dev.jsonl", rows)
    df = multinli.load(tmp_path / "cache", path=path, split_fractions=[0.6, 0.2, 0.2], split_seed=3)
    keep, labels, neg = _expected(rows)
    assert len(df) == len(keep) and df["label"].tolist() == labels and df["has_negation"].tolist() == neg
    for key, part in df.groupby(["label", "has_negation"]):
        n = len(part)
        counts = part["split"].value_counts()
        assert counts.get("train", 0) == round(0.6 * n) and counts.get("val", 0) == round(0.2 * n), key
    assert multinli.load(tmp_path / "cache", path=path, split_fractions=[0.6, 0.2, 0.2], split_seed=3).equals(df)


def test_hub_rows_are_mapped_by_label_name_not_id(tmp_path, monkeypatch):
    parts = mnli_parts(30, 12)
    frames = {"train": mnli_hub_frame(parts["train"]), "validation_matched": mnli_hub_frame(parts["dev_matched"]),
              "validation_mismatched": mnli_hub_frame(parts["dev_mismatched"])}

    class Split:
        def __init__(self, frame):
            self.frame = frame
            self.features = {"label": types.SimpleNamespace(names=["entailment", "neutral", "contradiction"])}

        def to_pandas(self):
            return self.frame.copy()

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda hub_id: calls.append(hub_id) or {k: Split(v) for k, v in frames.items()}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    df = multinli.load(tmp_path / "cache", format="hub")
    assert calls == ["nyu-mll/multi_nli"]
    official = multinli.load(tmp_path / "cache", path=write_mnli_official(tmp_path / "o", parts))
    pd.testing.assert_frame_equal(df, official)
    # hub id 0 is entailment, which is group_DRO's 1
    assert multinli.hub_frame(pd.DataFrame({"premise": ["p"], "hypothesis": ["h"], "label": [0]}))["gold"][0] == "entailment"


def test_hub_without_the_datasets_library_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataUnavailableError, match="pip install datasets"):
        multinli.load(tmp_path / "cache", format="hub")


def test_group_dro_metadata_gives_the_paper_split(tmp_path):
    parts = mnli_parts()
    folder = write_mnli_official(tmp_path / "o", parts)
    meta = write_group_dro_metadata(tmp_path / "metadata_random.csv", parts)
    df = multinli.load(tmp_path / "cache", path=folder, metadata_csv=tmp_path / "metadata_random.csv")
    assert len(df) == len(meta)
    assert df["split"].tolist() == [("train", "val", "test")[s] for s in meta["split"]]
    assert df["label"].tolist() == meta["gold_label"].tolist()
    assert df["has_negation"].tolist() == meta["sentence2_has_negation"].tolist()
    glue = multinli.load(tmp_path / "cache", path=write_mnli_glue(tmp_path / "g", parts),
                         metadata_csv=tmp_path / "metadata_random.csv")
    pd.testing.assert_frame_equal(df, glue)

    site = tmp_path / "site"
    site.mkdir()
    (site / "metadata_random.csv").write_bytes((tmp_path / "metadata_random.csv").read_bytes())
    with serve(site) as base:
        fetched = multinli.load(tmp_path / "cache", path=folder, metadata_csv="download",
                                metadata_url=f"{base}/metadata_random.csv")
    pd.testing.assert_frame_equal(df, fetched)
    assert (tmp_path / "cache" / "metadata_random.csv").exists()
    with pytest.raises(DataUnavailableError, match="metadata_random.csv"):
        multinli.load(tmp_path / "other", path=folder, metadata_csv="download", metadata_url=f"{UNREACHABLE}/m.csv")
    with pytest.raises(ConfigError, match="full MultiNLI"):
        multinli.load(tmp_path / "cache", path=write_mnli_local_jsonl(tmp_path / "one.jsonl", parts["train"]),
                      metadata_csv=tmp_path / "metadata_random.csv")

    meta.iloc[:-1].to_csv(tmp_path / "short.csv")
    with pytest.raises(CorruptDataError, match="rows"):
        multinli.load(tmp_path / "cache", path=folder, metadata_csv=tmp_path / "short.csv")
    shifted = meta.copy()
    shifted["gold_label"] = np.roll(shifted["gold_label"].to_numpy(), 1)
    shifted.to_csv(tmp_path / "shifted.csv")
    with pytest.raises(CorruptDataError, match="misaligned"):
        multinli.load(tmp_path / "cache", path=folder, metadata_csv=tmp_path / "shifted.csv")


@pytest.mark.parametrize("variant,pair", [("multinli_bin01", (0, 1)), ("multinli_bin02", (0, 2)), ("multinli_bin12", (1, 2))])
def test_binary_variants(variant, pair, tmp_path):
    from subgroup_robustness.data.groups import build_groupings

    cfg = compose([f"dataset={variant}"])
    assert list(cfg.dataset.source.labels) == list(pair)
    assert list(cfg.dataset.label_names) == [MNLI_LABELS[i] for i in pair]
    assert cfg.dataset.train.lr == 2e-5 and cfg.dataset.max_length == 128 and cfg.dataset.text_pair
    assert len(build_groupings(cfg.dataset)["groups"].group_names) == 4
    parts = mnli_parts()
    full = multinli.load(tmp_path / "c", path=write_mnli_official(tmp_path / "o", parts))
    binary = multinli.load(tmp_path / "c", path=tmp_path / "o", labels=list(pair))
    expect = full[full["label"].isin(pair)]
    assert binary["text_pair"].tolist() == expect["text_pair"].tolist()
    assert binary["label"].tolist() == [pair.index(x) for x in expect["label"]]


def test_multinli_config_is_the_papers():
    cfg = compose(["dataset=multinli"])
    d = cfg.dataset
    assert list(d.label_names) == ["contradiction", "entailment", "neutral"]
    assert (d.max_length, d.train.lr, d.train.weight_decay, d.train.batch_size, d.train.max_epochs) == (128, 2e-5, 0.0, 32, 5)


def test_download_is_cached_and_checksummed(tmp_path):
    parts = mnli_parts(60, 30)
    site = tmp_path / "site"
    site.mkdir()
    archive = zip_mnli_official(site / "multinli_1.0.zip", parts)
    with serve(site) as base:
        with pytest.raises(CorruptDataError, match="md5"):
            multinli.load(tmp_path / "bad", url=f"{base}/multinli_1.0.zip", md5="0" * 32)
        assert not (tmp_path / "bad" / "multinli_1.0.zip").exists()  # a bad download is not kept
        df = multinli.load(tmp_path / "cache", url=f"{base}/multinli_1.0.zip", md5=md5(archive))
    assert (tmp_path / "cache" / "multinli_1.0" / "multinli_1.0_train.jsonl").exists()
    assert not (tmp_path / "cache" / "multinli_1.0.zip").exists()
    again = multinli.load(tmp_path / "cache", url=f"{UNREACHABLE}/gone.zip")  # server gone: the cache serves
    pd.testing.assert_frame_equal(df, again)


def test_offline_without_data_fails_fast_and_says_what_to_do(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        multinli.load(tmp_path / "cache", url=f"{UNREACHABLE}/multinli_1.0.zip")
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    for part in ("multinli", "multinli_1.0_train.jsonl", "train.tsv", "dataset.source.path", "multinli_1.0.zip"):
        assert part in msg


def test_offline_run_stops_with_the_message(tmp_path):
    t0 = time.perf_counter()
    proc = run_cli(["dataset=multinli", f"dataset.source.url={UNREACHABLE}/multinli_1.0.zip", "logger=none",
                    "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                   env={"SR_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "multinli" in out and "dataset.source.path" in out and "multinli_1.0_train.jsonl" in out
    assert "Traceback" not in out
    assert time.perf_counter() - t0 < 90  # interpreter start-up included; the failure itself is immediate


def test_broken_files_are_named(tmp_path):
    parts = mnli_parts(30, 12)
    folder = write_mnli_official(tmp_path / "o", parts)
    f = folder / "multinli_1.0_train.jsonl"
    f.write_bytes(f.read_bytes()[:-40])  # a cut download: the last record is incomplete
    with pytest.raises(CorruptDataError, match=r"multinli_1.0_train.jsonl, line 30: not valid JSON"):
        multinli.load(tmp_path / "c", path=folder)
    glue = write_mnli_glue(tmp_path / "g", parts)
    (glue / "train.tsv").write_bytes((glue / "train.tsv").read_bytes()[:-25])
    with pytest.raises(CorruptDataError, match="train.tsv"):
        multinli.load(tmp_path / "c", path=glue)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"}) + "\n")
    with pytest.raises(CorruptDataError, match="maybe"):
        multinli.load(tmp_path / "c", path=bad)
    (tmp_path / "z.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptDataError, match="z.zip"):
        multinli.load(tmp_path / "c", path=tmp_path / "z.zip")
    with pytest.raises(DataUnavailableError, match="does not exist"):
        multinli.load(tmp_path / "c", path=tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match="format"):
        multinli.load(tmp_path / "c", path=bad, format="csv")


@pytest.mark.skipif(not SHARED_DEV.exists(), reason="the real MultiNLI dev-matched file is not next to the repo")
def test_real_dev_matched_group_counts():
    """Counts computed here with a separate tokenizer (regex) must equal the loader's."""
    import re

    punct = re.compile("[" + re.escape(string.punctuation) + "]")
    expected = Counter()
    with open(SHARED_DEV, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            neg = bool({"nobody", "no", "never", "nothing"} & set(punct.sub("", row["hypothesis"]).lower().split(" ")))
            expected[(MNLI_LABELS.index(row["label"]), int(neg))] += 1
    df = multinli.load(Path("/nonexistent-cache"), path=SHARED_DEV)
    got = Counter(zip(df["label"].tolist(), df["has_negation"].tolist()))
    assert got == expected and sum(got.values()) == 9815
    assert len(got) == 6 and min(got.values()) > 50  # every one of the 6 groups is populated
