"""SCOTUS (FairLex): release records with ids or names, hub rows, the attribute choice, the Zenodo
download, and clear failures."""

from __future__ import annotations

import json
import sys
import time
import types

import pandas as pd
import pytest

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.data.sources import scotus
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from tests.data.fixtures import UNREACHABLE, scotus_parts, serve, write_fairlex, zip_fairlex
from tests.helpers import compose


@pytest.mark.parametrize("names", [False, True], ids=["ids", "names"])
def test_release_records_with_ids_or_names(tmp_path, names):
    parts = scotus_parts(names=names)
    df = scotus.load(tmp_path / "cache", path=write_fairlex(tmp_path / "scotus", parts))
    assert list(df.columns) == ["text", "label", "decision_direction", "respondent_type", "split"]
    ref = scotus_parts(names=False)  # the same rows with ids
    assert df["split"].tolist() == [s for s, rs in ref.items() for _ in rs]
    assert df["text"].tolist() == [r["text"] for rs in ref.values() for r in rs]
    assert df["label"].tolist() == [r["label"] for rs in ref.values() for r in rs]
    for attr in ("decision_direction", "respondent_type"):
        assert df[attr].tolist() == [r["attributes"][attr] for rs in ref.values() for r in rs]


def test_hub_rows_have_attributes_as_columns(tmp_path, monkeypatch):
    parts = scotus_parts()
    split_names = {"train": "train", "val": "validation", "test": "test"}
    frames = {split_names[s]: pd.DataFrame([{"text": r["text"], "label": r["label"], **r["attributes"]} for r in rows])
              for s, rows in parts.items()}
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a: calls.append(a) or {k: types.SimpleNamespace(to_pandas=lambda v=v: v) for k, v in frames.items()}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    df = scotus.load(tmp_path / "c", format="hub")
    assert calls == [("coastalcph/fairlex", "scotus")]
    pd.testing.assert_frame_equal(df, scotus.load(tmp_path / "c", path=write_fairlex(tmp_path / "s", parts)))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataUnavailableError, match="pip install datasets"):
        scotus.load(tmp_path / "c", format="hub")


def test_parquet_export_layout_is_recognized(tmp_path):
    for rel in ("scotus/train/0000.parquet", "scotus/validation/0000.parquet", "scotus/test/0000.parquet",
                "scotus/test/0001.parquet", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = scotus.split_files(tmp_path)
    assert {s: [p.relative_to(tmp_path).as_posix() for p in f] for s, f in found.items()} == {
        "train": ["scotus/train/0000.parquet"], "val": ["scotus/validation/0000.parquet"],
        "test": ["scotus/test/0000.parquet", "scotus/test/0001.parquet"]}
    flat = tmp_path / "flat"
    for name in ("fairlex-train.parquet", "fairlex-validation.parquet", "fairlex-test.parquet"):
        flat.mkdir(exist_ok=True)
        (flat / name).write_bytes(b"")
    assert [p.name for p in scotus.split_files(flat)["val"]] == ["fairlex-validation.parquet"]


def test_parquet_rows_load(tmp_path):
    pytest.importorskip("pyarrow")
    parts = scotus_parts()
    folder = tmp_path / "pq"
    folder.mkdir()
    for s, rows in parts.items():
        pd.DataFrame([{"text": r["text"], "label": r["label"], **r["attributes"]} for r in rows]).to_parquet(folder / f"{s}.parquet")
    pd.testing.assert_frame_equal(scotus.load(tmp_path / "c", path=folder),
                                  scotus.load(tmp_path / "c", path=write_fairlex(tmp_path / "s", parts)))


def test_parquet_without_an_engine_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    folder = write_fairlex(tmp_path / "s", scotus_parts())
    (folder / "train.jsonl").unlink()
    (folder / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataUnavailableError, match="pyarrow"):
        scotus.load(tmp_path / "c", path=folder)


def test_attribute_is_a_config_choice():
    d = compose(["dataset=scotus"]).dataset
    assert (d.max_length, d.train.lr, d.train.weight_decay, d.train.batch_size, d.train.max_epochs) == (512, 1e-5, 0.0, 16, 20)
    assert list(d.label_names) == list(scotus.LABELS) and len(d.label_names) == 11
    groups = build_groupings(d)["groups"].group_names
    assert len(groups) == 22 and groups[:2] == ["criminal_procedure:conservative", "criminal_procedure:liberal"]
    by_respondent = build_groupings(compose(["dataset=scotus", "dataset.attribute=respondent_type"]).dataset)["groups"]
    assert len(by_respondent.group_names) == 55 and by_respondent.group_names[3] == "criminal_procedure:public_entity"
    assert compose(["dataset=scotus", "dataset.truncation_side=left"]).dataset.truncation_side == "left"


def test_zenodo_download_is_extracted_and_cached(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    archive = zip_fairlex(site / "scotus.zip", scotus_parts())
    (site / "cut.zip").write_bytes(archive.read_bytes()[:-100])
    with serve(site) as base:
        with pytest.raises(CorruptDataError, match="scotus.zip.*removed"):
            scotus.load(tmp_path / "bad", url=f"{base}/cut.zip")
        df = scotus.load(tmp_path / "cache", url=f"{base}/scotus.zip")
    assert len(df) == 198 and set(df["split"]) == {"train", "val", "test"}
    pd.testing.assert_frame_equal(df, scotus.load(tmp_path / "cache", url=f"{UNREACHABLE}/gone.zip"))
    pd.testing.assert_frame_equal(df, scotus.load(tmp_path / "c2", path=archive))  # a local zip works too


def test_offline_without_data_fails_fast_and_says_what_to_do(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        scotus.load(tmp_path / "cache", url=f"{UNREACHABLE}/scotus.zip")
    assert time.perf_counter() - t0 < 10
    for part in ("scotus", "train.jsonl", "val.jsonl", "dataset.source.path"):
        assert part in str(info.value)


def test_broken_files_are_named(tmp_path):
    parts = scotus_parts()
    folder = write_fairlex(tmp_path / "s", parts)
    (folder / "val.jsonl").write_bytes((folder / "val.jsonl").read_bytes()[:-20])
    with pytest.raises(CorruptDataError, match=r"val.jsonl, line 44: not valid JSON"):
        scotus.load(tmp_path / "c", path=folder)
    parts["val"][0]["label"] = "Space Law"
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match="Space Law"):
        scotus.load(tmp_path / "c", path=folder)
    parts["val"][0]["label"] = 11
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match="outside 0..10"):
        scotus.load(tmp_path / "c", path=folder)
    parts["val"][0] = {"text": "t", "label": 1, "attributes": {"decision_direction": 0}}
    write_fairlex(folder, parts)
    with pytest.raises(CorruptDataError, match="respondent_type"):
        scotus.load(tmp_path / "c", path=folder)
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataUnavailableError, match="test"):
        scotus.load(tmp_path / "c", path=folder)
    (tmp_path / "x.zip").write_text(json.dumps({"not": "a zip"}))
    with pytest.raises(CorruptDataError, match="x.zip.*Replace it"):
        scotus.load(tmp_path / "c", path=tmp_path / "x.zip")
