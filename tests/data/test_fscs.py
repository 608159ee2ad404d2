"""FSCS (FairLex): release records with ids or FairLex's own names (accents, spaces), the zip layout and the
Zenodo download (its sha256 printed, or checked once recorded), missing-value groups left out of the
primary grouping and kept in another, per-language groupings, clear errors, and a whole run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from subgroup_robustness.data.datamodule import GroupDataModule
from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.data.sources import fairlex, fscs
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError, DataUnavailableError
from subgroup_robustness.utils.io import sha256_file
from tests.data.fixtures import UNREACHABLE, run_overrides, serve, write_fairlex, zip_fairlex
from tests.data.multilingual_fixtures import fairlex_parts
from tests.helpers import compose, run_in_process


def _dataset(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["dataset=fscs", *overrides]).dataset, resolve=True)


@pytest.mark.parametrize("names", [False, True], ids=["ids", "names"])
def test_release_records_with_ids_or_fairlex_names(tmp_path, names):
    df = fscs.load(tmp_path / "cache", path=write_fairlex(tmp_path / "fscs", fairlex_parts("fscs", names=names)))
    assert list(df.columns) == ["text", "label", "decision_language", "legal_area", "court_region", "split"]
    ref = fairlex_parts("fscs", names=False)  # the same rows with ids
    assert df["split"].tolist() == [s for s, rs in ref.items() for _ in rs]
    assert df["label"].tolist() == [r["label"] for rs in ref.values() for r in rs]
    for attr in fscs.ATTRIBUTES:
        assert df[attr].tolist() == [r["attributes"][attr] for rs in ref.values() for r in rs]


def test_names_match_accent_case_and_space_insensitively():
    at = dict(where="x", what="fscs")
    regions, release = fscs.ATTRIBUTES["court_region"], fscs.SPEC.release_attributes["court_region"]
    assert fairlex.code("Région lémanique", regions, "court_region", release=release, **at) == 1
    assert fairlex.code("region_lemanique", regions, "court_region", release=release, **at) == 1
    assert fairlex.code("ZÜRICH", regions, "court_region", release=release, **at) == 2
    assert fairlex.code("n/a", regions, "court_region", release=release, **at) == 0
    assert fairlex.code("public law", fscs.ATTRIBUTES["legal_area"], "legal_area", **at) == 1
    with pytest.raises(CorruptDataError, match=r"unknown court_region 'Mars'; FairLex's values are \['n/a', 'Région"):
        fairlex.code("Mars", regions, "court_region", release=release, **at)


def test_missing_value_groups_are_left_out_of_the_primary_grouping_only(tmp_path):
    folder = write_fairlex(tmp_path / "fscs", fairlex_parts("fscs", names=True))
    g = build_groupings(_dataset())
    assert "dismissal:other" not in g["groups"].group_names and len(g["groups"].group_names) == 10
    assert "dismissal:other" in g["groups_with_missing"].group_names and len(g["groups_with_missing"].group_names) == 12
    dm = GroupDataModule(dataset=_dataset(f"dataset.source.path={folder}", f"dataset.source.cache_dir={tmp_path / 'c'}"))
    primary, full = dm.group_counts("groups"), dm.group_counts("groups_with_missing")
    df = dm.load_table()
    other = int((df["legal_area"] == 0).sum())
    assert other > 0 and full["all"].sum() == len(df) and primary["all"].sum() == len(df) - other
    # court_region: its n_a is left out too, and describe's numbers agree
    g = build_groupings(_dataset("dataset.attribute=court_region"))
    assert [n for n in g["groups"].group_names if "n_a" in n] == [] and len(g["groups"].group_names) == 16
    assert len(g["groups_with_missing"].group_names) == 18


def test_per_language_groupings_carry_the_language():
    g = build_groupings(_dataset())
    assert [k for k in g if k.startswith("lang_")] == ["lang_de", "lang_fr", "lang_it"]
    de = g["lang_de"]
    assert de.within == ("decision_language", "de") and de.group_names[:2] == ["dismissal:public_law", "dismissal:penal_law"]
    assert g["language"].group_names == ["de:dismissal", "de:approval", "fr:dismissal", "fr:approval", "it:dismissal",
                                         "it:approval"]
    import torch

    meta = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [1, 2, 3, 0]])  # label, language, legal_area, court_region
    assert de.masks(meta).sum().item() == 0  # two French examples and an Italian one: none German
    assert g["lang_fr"].masks(meta)[:, 0].tolist() == [True, True, False]  # dismissal:public_law
    assert g["lang_it"].masks(meta)[2].nonzero().flatten().tolist() == [7]  # approval:civil_law


def test_zip_layout_and_zenodo_download_print_the_checksum(tmp_path, capsys, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    archive = zip_fairlex(site / "fscs.zip", fairlex_parts("fscs", names=True))
    with serve(site) as base:
        df = fscs.load(tmp_path / "cache", url=f"{base}/fscs.zip")
        printed = capsys.readouterr().out
        assert f"fscs.zip: sha256 {sha256_file(archive)}, {archive.stat().st_size:,} bytes" in printed
        # once recorded, the checksum is checked: a different archive is refused and removed
        monkeypatch.setattr(fscs, "SPEC", fairlex.Spec(**{**fscs.SPEC.__dict__, "sha256": "0" * 64}))
        with pytest.raises(CorruptDataError, match="fscs.zip is corrupt or altered.*removed"):
            fscs.load(tmp_path / "cache2", url=f"{base}/fscs.zip")
    assert len(df) == 162 and set(df["split"]) == {"train", "val", "test"}
    pd.testing.assert_frame_equal(df, fscs.load(tmp_path / "c3", path=archive))  # a local zip works too
    assert (tmp_path / "cache" / "fairlex_fscs" / "val.jsonl").exists() and not (tmp_path / "cache" / "fscs.zip").exists()


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        fscs.load(tmp_path / "cache", url=f"{UNREACHABLE}/fscs.zip")
    for part in ("fscs", "train.jsonl", "val.jsonl", "dataset.source.path"):
        assert part in str(info.value)
    parts = fairlex_parts("fscs")
    folder = write_fairlex(tmp_path / "f", parts)
    (folder / "test.jsonl").write_bytes((folder / "test.jsonl").read_bytes()[:-15])
    with pytest.raises(CorruptDataError, match=r"test.jsonl, line 36: not valid JSON"):
        fscs.load(tmp_path / "c", path=folder)
    parts["test"][3]["attributes"]["legal_area"] = "space law"
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match=r"test.jsonl record 4: unknown legal_area 'space law'"):
        fscs.load(tmp_path / "c", path=folder)
    parts["test"][3]["attributes"]["legal_area"] = 6
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match=r"legal_area id 6 is outside 0..5"):
        fscs.load(tmp_path / "c", path=folder)
    parts["test"][3]["attributes"]["legal_area"] = 2
    del parts["test"][3]["attributes"]["court_region"]
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match="has no attribute 'court_region'"):
        fscs.load(tmp_path / "c", path=folder)
    (folder / "val.jsonl").unlink()
    with pytest.raises(DataUnavailableError, match=r"no \['val'\] split"):
        fscs.load(tmp_path / "c", path=folder)
    with pytest.raises(ConfigError, match="format='xml'"):
        fscs.load(tmp_path / "c", path=folder, format="xml")


def test_exclude_names_are_checked():
    cfg = _dataset()
    cfg["groupings"]["groups"]["exclude"] = {"legal_area": ["outer_space"]}
    with pytest.raises(ConfigError, match=r"`exclude.legal_area` names \['outer_space'\]"):
        build_groupings(cfg)


def test_a_whole_run(tiny_bert_factory, sr_env):
    folder = write_fairlex(sr_env / "fscs", fairlex_parts("fscs", names=True))
    out = sr_env / "run"
    rec = run_in_process(run_overrides(tiny_bert_factory(2), out, "fscs", f"dataset.source.path={folder}"))
    assert rec["status"] == "completed" and json.loads((out / "results.json").read_text())["status"] == "completed"
    test = rec["metrics"]["test"]
    assert 0.0 <= test["test/acc_wg"] <= test["test/acc_avg"] <= 1.0
    for lang in ("de", "fr", "it"):
        assert f"test/lang_{lang}/acc_wg" in test
    assert len([k for k in test if k.startswith("test/count/")]) == 10
