"""Multilingual HateCheck: one CSV per language with the per-language column differences (gendered
languages add gender_male/gender_female, Dutch and Mandarin do not), the target identities normalised
across spellings, groups = target x label per language, the recorded checksums, and clear errors."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from omegaconf import OmegaConf

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.data.sources import mhc
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError
from tests.data.fixtures import UNREACHABLE, serve
from tests.data.multilingual_fixtures import MHC_GENDERED, mhc_rows, write_mhc
from tests.helpers import compose

LANGS = ("german", "hindi", "mandarin", "arabic", "polish", "dutch")


def test_files_with_different_columns_load(tmp_path):
    root = write_mhc(tmp_path / "repo", LANGS)
    headers = {lang: (root / mhc.FOLDER / mhc.file_name(lang)).read_text(encoding="utf-8").splitlines()[0]
               for lang in LANGS}
    assert "gender_male" in headers["german"] and "gender_male" not in headers["mandarin"]
    df = mhc.load(tmp_path / "cache", path=root, languages=list(LANGS))
    assert list(df.columns) == ["text", "label", "target", "language", "functionality", "case_id", "split"]
    assert len(df) == 40 * len(LANGS) and set(df["split"]) == {"test"}
    assert sorted({mhc.LANGUAGES[i] for i in df["language"]}) == ["ar", "de", "hi", "nl", "pl", "zh"]
    rows = mhc_rows("german", 40)
    de = df[df["language"] == mhc.LANGUAGES.index("de")]
    assert de["label"].tolist() == [int(r["label_gold"] == "hateful") for r in rows]
    assert de["text"].tolist() == [r["test_case"] for r in rows]  # quoted fields with commas survive


def test_target_spellings_are_normalised(tmp_path):
    df = mhc.load(tmp_path / "cache", path=write_mhc(tmp_path / "repo", LANGS), languages=list(LANGS))
    names = {mhc.TARGETS[i] for i in df["target"]}
    # "Jews" (ar) and "jews" (de) and "jewish people" (pl) are one identity; "immigrant" is "immigrants"
    assert {"jews", "immigrants", "muslims", "black_people", "lower_caste", "north_east_indians", "no_target"} <= names
    pl = df[df["language"] == mhc.LANGUAGES.index("pl")]
    assert {mhc.TARGETS[i] for i in pl["target"]} == {"women", "trans_people", "gay_people", "asian_people",
                                                      "disabled_people", "jews", "immigrants", "no_target"}
    assert mhc.target_code("Black people", "x") == mhc.target_code("black people", "x") == mhc.TARGETS.index("black_people")
    with pytest.raises(CorruptDataError, match=r"x: unknown target_ident 'aliens'"):
        mhc.target_code("aliens", "x")


def test_groups_are_target_by_label_per_language():
    d = OmegaConf.to_container(compose(["dataset=mhc"]).dataset, resolve=True)
    g = build_groupings(d)
    assert d["eval_only"] is True and d["label_names"] == ["non_hateful", "hateful"]
    assert not any("no_target" in n for n in g["groups"].group_names)
    assert g["groups"].group_names[0] == "ar:women:non_hateful" and len(g["groups"].group_names) == 10 * 14 * 2
    assert [k for k in g if k.startswith("lang_")] == [f"lang_{c}" for c in mhc.LANGUAGES]
    assert g["lang_hi"].within == ("language", "hi") and g["lang_hi"].group_names[:2] == ["women:non_hateful",
                                                                                            "women:hateful"]
    assert len(g["functionality"].group_names) == 34


def test_disagreement_can_exclude_templates(tmp_path):
    root = write_mhc(tmp_path / "repo", ["german"])
    full = mhc.load(tmp_path / "cache", path=root, languages=["de"])
    kept = mhc.load(tmp_path / "cache", path=root, languages=["german"], exclude_disagreement=True)
    assert len(full) == 40 and len(kept) == 36


def test_download_checks_the_recorded_checksum(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_mhc(site, ["german", "mandarin"])
    folder = site / mhc.FOLDER
    release = {lang: (hashlib.sha256((folder / mhc.file_name(lang)).read_bytes()).hexdigest(), 0, 40)
               for lang in ("german", "mandarin")}
    monkeypatch.setattr(mhc, "RELEASE", release)
    with serve(folder) as base:
        df = mhc.load(tmp_path / "cache", languages=["de", "zh"], base_url=base)
        assert len(df) == 80
        monkeypatch.setattr(mhc, "RELEASE", {"german": ("0" * 64, 0, 40)})
        with pytest.raises(CorruptDataError, match="hatecheck_cases_final_german.csv is corrupt or altered"):
            mhc.load(tmp_path / "cache2", languages=["de"], base_url=base)
    assert not (tmp_path / "cache2" / mhc.FOLDER / mhc.file_name("german")).exists()  # removed
    assert len(mhc.load(tmp_path / "cache", languages=["de", "zh"], base_url=UNREACHABLE)) == 80  # cached
    with pytest.raises(DataUnavailableError, match=r"mhc: could not download .*MHC Final Cases"):
        mhc.load(tmp_path / "cache3", languages=["de"], base_url=UNREACHABLE)


def test_the_recorded_release_is_complete():
    assert set(mhc.RELEASE) == set(mhc.FILE_LANGUAGES)
    assert sum(n for _, _, n in mhc.RELEASE.values()) == 36582  # the paper's total
    assert all(len(sha) == 64 for sha, _, _ in mhc.RELEASE.values())


def test_a_zip_of_the_repository_works(tmp_path):
    root = write_mhc(tmp_path / "repo", ["hindi"])
    archive = tmp_path / "multilingual-hatecheck-main.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        f = root / mhc.FOLDER / mhc.file_name("hindi")
        zf.write(f, f"multilingual-hatecheck-main/{mhc.FOLDER}/{f.name}")
    assert len(mhc.load(tmp_path / "cache", path=archive, languages=["hi"])) == 40


def test_broken_or_missing_files_are_named(tmp_path):
    root = write_mhc(tmp_path / "repo", ["german"])
    f = root / mhc.FOLDER / mhc.file_name("german")
    with pytest.raises(DataUnavailableError, match="hatecheck_cases_final_hindi.csv"):
        mhc.load(tmp_path / "c", path=root, languages=["german", "hindi"])
    text = f.read_text(encoding="utf-8")
    f.write_text(text.replace(",non-hateful,", ",maybe,", 1), encoding="utf-8")
    with pytest.raises(CorruptDataError, match=r"hatecheck_cases_final_german.csv, line \d+: label_gold is 'maybe'"):
        mhc.load(tmp_path / "c", path=root, languages=["german"])
    f.write_text(text.replace("test_case", "text"), encoding="utf-8")
    with pytest.raises(CorruptDataError, match=r"has no column\(s\) \['test_case'\]"):
        mhc.load(tmp_path / "c", path=root, languages=["german"])
    f.write_bytes(text.encode("utf-8")[:-30])
    with pytest.raises(CorruptDataError, match="the last line has no line break"):
        mhc.load(tmp_path / "c", path=root, languages=["german"])
    with pytest.raises(ConfigError, match=r"languages=\['english'\]"):
        mhc.load(tmp_path / "c", path=root, languages=["english"])


def test_gendered_languages_are_the_readme_ones():
    assert MHC_GENDERED <= {"french", "spanish", "portuguese", "hindi", "arabic", "italian", "polish", "german"}
