"""XNLI: the official TSV and JSONL files, the negation attribute computed on the English hypothesis and
projected to every language by pairID (and by row for XNLI-MT's training files), the three training
choices, per-language groupings, the zip layout and download, clear errors, and a whole run."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.data.sources import multinli, xnli
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError
from tests.data.fixtures import UNREACHABLE, mnli_parts, run_overrides, serve, write_mnli_official
from tests.data.multilingual_fixtures import (
    XNLI_LANGUAGES, translate, write_xnli, write_xnli_mt, write_xnli_tsv, xnli_pairs, xnli_parts, xnli_rows, zip_xnli,
)
from tests.helpers import compose, run_in_process


def _load(tmp_path, **kw):
    kw.setdefault("train", "none")
    return xnli.load(tmp_path / "cache", **kw)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_dev_and_test_in_every_language(tmp_path, fmt):
    df = _load(tmp_path, path=write_xnli(tmp_path / "x", xnli_parts(), fmt))
    assert list(df.columns) == ["text", "text_pair", "label", "has_negation", "language", "pair_id", "split"]
    sizes = df.groupby(["split", "language"]).size()
    assert set(sizes.loc["val"]) == {24} and set(sizes.loc["test"]) == {30} and len(sizes) == 30
    assert df["label"].isin([0, 1, 2]).all()
    other = _load(tmp_path, path=write_xnli(tmp_path / "y", xnli_parts(), "jsonl" if fmt == "tsv" else "tsv"))
    pd.testing.assert_frame_equal(df, other)


def test_a_never_in_the_english_hypothesis_is_negation_in_every_language(tmp_path):
    df = _load(tmp_path, path=write_xnli(tmp_path / "x", xnli_parts()))
    test = df[df["split"] == "test"]
    en = test[test["language"] == XNLI_LANGUAGES.index("en")]
    never = en[en["text_pair"].str.contains(r"\bnever\b")]
    assert len(never) > 0 and (never["has_negation"] == 1).all()
    for pair in never["pair_id"]:
        rows = test[test["pair_id"] == pair]
        assert len(rows) == 15 and (rows["has_negation"] == 1).all() and rows["label"].nunique() == 1
        translated = rows[rows["language"] != XNLI_LANGUAGES.index("en")]["text_pair"]
        # the translations carry no English negation word: the flag can only come from the English pair
        assert not any(multinli.has_negation(h) for h in translated)
    # and every pair has the same flag in all languages
    assert (test.groupby("pair_id")["has_negation"].nunique() == 1).all()
    assert test.groupby("pair_id")["has_negation"].first().sum() == len(never)


def test_rows_without_an_english_pair_cannot_be_projected(tmp_path):
    parts = xnli_parts()
    parts["test"] = [r for r in parts["test"] if not (r["language"] == "en" and r["pairID"] == "2003")]
    with pytest.raises(CorruptDataError, match=r"xnli.test.tsv: pairID\(s\) \['2003'\] have no English row"):
        _load(tmp_path, path=write_xnli(tmp_path / "x", parts))
    parts["test"] = [r for r in parts["test"] if r["language"] != "en"]
    with pytest.raises(CorruptDataError, match="has no English rows"):
        _load(tmp_path, path=write_xnli(tmp_path / "y", parts))


def test_languages_restrict_the_rows_but_english_still_gives_the_groups(tmp_path):
    df = _load(tmp_path, path=write_xnli(tmp_path / "x", xnli_parts()), languages=["sw", "zh"])
    assert sorted({XNLI_LANGUAGES[i] for i in df["language"]}) == ["sw", "zh"]
    full = _load(tmp_path, path=write_xnli(tmp_path / "y", xnli_parts()))
    sw = full[full["language"] == XNLI_LANGUAGES.index("sw")].reset_index(drop=True)
    pd.testing.assert_frame_equal(df[df["language"] == XNLI_LANGUAGES.index("sw")].reset_index(drop=True), sw)
    with pytest.raises(ConfigError, match=r"languages=\['klingon'\]"):
        _load(tmp_path, path=tmp_path / "x", languages=["klingon"])


def test_train_on_english_multinli(tmp_path):
    mnli = write_mnli_official(tmp_path / "mnli", mnli_parts(60, 20))
    df = xnli.load(tmp_path / "cache", path=write_xnli(tmp_path / "x", xnli_parts()),
                   multinli={"path": str(mnli)})
    train = df[df["split"] == "train"]
    assert len(train) == 60 and (train["language"] == XNLI_LANGUAGES.index("en")).all()
    ref = multinli.load(tmp_path / "c2", path=mnli, val_fraction=0.0)
    ref = ref[ref["split"] == "train"]
    assert train["has_negation"].tolist() == ref["has_negation"].tolist()
    assert train["label"].tolist() == ref["label"].tolist()


def test_translate_train_projects_negation_by_row(tmp_path):
    mt = write_xnli_mt(tmp_path / "mt", 30, ["en", "de", "sw"])
    df = xnli.load(tmp_path / "cache", path=write_xnli(tmp_path / "x", xnli_parts()), train="translate_train",
                   mt_path=mt, train_languages=["de", "sw"])
    train = df[df["split"] == "train"]
    assert len(train) == 60 and sorted({XNLI_LANGUAGES[i] for i in train["language"]}) == ["de", "sw"]
    pairs = xnli_pairs(30, 5)
    expected = [int(multinli.has_negation(p["hypothesis"])) for p in pairs]
    for code in ("de", "sw"):
        part = train[train["language"] == XNLI_LANGUAGES.index(code)]
        assert part["has_negation"].tolist() == expected and sum(expected) > 0
        assert part["text_pair"].tolist() == [translate(p["hypothesis"], code) for p in pairs]
        assert part["label"].tolist() == [xnli.LABELS.index(p["gold"]) for p in pairs]  # 'contradictory' read
    short = tmp_path / "mt" / "XNLI-MT-1.0" / "multinli" / "multinli.train.sw.tsv"
    short.write_text("\n".join(short.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(CorruptDataError, match="multinli.train.sw.tsv has 27 rows, the English file 30"):
        xnli.load(tmp_path / "cache", path=tmp_path / "x", train="translate_train", mt_path=mt, train_languages=["sw"])
    with pytest.raises(DataUnavailableError, match="multinli.train.fr.tsv"):
        xnli.load(tmp_path / "cache", path=tmp_path / "x", train="translate_train", mt_path=mt, train_languages=["fr"])


def test_zip_layout_and_download(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    archive = zip_xnli(site / "XNLI-1.0.zip", xnli_parts())
    with serve(site) as base:
        df = _load(tmp_path, url=f"{base}/XNLI-1.0.zip")
    assert "XNLI-1.0.zip: sha256" in capsys.readouterr().out
    pd.testing.assert_frame_equal(df, _load(tmp_path, url=f"{UNREACHABLE}/XNLI-1.0.zip"))  # cached
    pd.testing.assert_frame_equal(df, xnli.load(tmp_path / "c2", path=archive, train="none"))
    with pytest.raises(DataUnavailableError, match=r"xnli: no local copy .*xnli.dev.tsv"):
        xnli.load(tmp_path / "c3", url=f"{UNREACHABLE}/XNLI-1.0.zip", train="none")


def test_broken_files_are_named(tmp_path):
    folder = write_xnli(tmp_path / "x", xnli_parts())
    dev = folder / "XNLI-1.0" / "xnli.dev.tsv"
    lines = dev.read_text().splitlines()
    lines[7] = "\t".join(lines[7].split("\t")[:8])  # a row cut after sentence2
    dev.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptDataError, match=r"xnli.dev.tsv, line 8: the row is short of fields"):
        _load(tmp_path, path=folder)
    dev.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    with pytest.raises(CorruptDataError, match=r"xnli.dev.tsv, line 6: the last line has no line break"):
        _load(tmp_path, path=folder)
    dev.unlink()
    (folder / "XNLI-1.0" / "xnli.test.tsv").unlink()
    with pytest.raises(DataUnavailableError, match="holds neither xnli.dev.tsv"):
        _load(tmp_path, path=folder)
    rows = xnli_rows(xnli_pairs(3, 1), ["en", "xx"])
    write_xnli_tsv(tmp_path / "z" / "xnli.dev.tsv", rows)
    write_xnli_tsv(tmp_path / "z" / "xnli.test.tsv", rows)
    with pytest.raises(CorruptDataError, match=r"unknown language\(s\) \['xx'\]"):
        _load(tmp_path, path=tmp_path / "z")
    with pytest.raises(ConfigError, match="train='both'"):
        _load(tmp_path, path=tmp_path / "z", train="both")


def test_groupings_per_language():
    d = OmegaConf.to_container(compose(["dataset=xnli"]).dataset, resolve=True)
    g = build_groupings(d)
    assert len(g["groups"].group_names) == 90 and g["groups"].group_names[0] == "ar:contradiction:no_negation"
    assert [k for k in g if k.startswith("lang_")] == [f"lang_{c}" for c in XNLI_LANGUAGES]
    assert g["lang_sw"].within == ("language", "sw") and len(g["lang_sw"].group_names) == 6
    assert g["language"].group_names == list(XNLI_LANGUAGES)
    assert list(d["label_names"]) == list(multinli.LABELS)  # a MultiNLI model scores XNLI with the same ids
    assert d["eval"] == {"source": {"train": "none"}}


def test_a_whole_run_trained_on_multinli(tiny_bert_factory, sr_env):
    mnli = write_mnli_official(sr_env / "mnli", mnli_parts(90, 20))
    folder = write_xnli(sr_env / "xnli", xnli_parts(12, 15, ["en", "de", "sw", "zh"]))
    rec = run_in_process(run_overrides(tiny_bert_factory(3), sr_env / "run", "xnli", f"dataset.source.path={folder}",
                                       f"dataset.source.multinli.path={mnli}"))
    assert rec["status"] == "completed"
    test = rec["metrics"]["test"]
    assert rec["groups"]["test"]["groups"]["n"] == 60
    for code in ("en", "de", "sw", "zh"):
        assert 0.0 <= test[f"test/lang_{code}/acc_wg"] <= test[f"test/language/acc/{code}"] <= 1.0
    assert "test/lang_fr/acc/contradiction:negation" not in test  # languages absent from the files: no groups
