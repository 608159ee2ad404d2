"""ECtHR (FairLex): multi-label records (lists of article names or ids, empty = no violation) as bitmasks in
the table's label column, the missing-value groups, attribute-only groupings, and clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from subgroup_robustness.data.datamodule import GroupDataModule
from subgroup_robustness.data.groups import LabelSets, build_groupings, is_multilabel, value_names
from subgroup_robustness.data.sources import ecthr, fairlex
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError
from tests.data.fixtures import write_fairlex
from tests.data.multilingual_fixtures import ECTHR_RELEASE, fairlex_parts
from tests.helpers import compose


def _dataset(*overrides: str) -> dict:
    return OmegaConf.to_container(compose(["dataset=ecthr", *overrides]).dataset, resolve=True)


@pytest.mark.parametrize("names", [False, True], ids=["ids", "names"])
def test_label_lists_become_bitmasks(tmp_path, names):
    parts = fairlex_parts("ecthr", names=names)
    df = ecthr.load(tmp_path / "c", path=write_fairlex(tmp_path / "e", parts))
    ref = fairlex_parts("ecthr", names=False)
    expected = [sum(1 << k for k in r["labels"]) for rs in ref.values() for r in rs]
    assert df["label"].tolist() == expected
    assert (df["label"] == 0).sum() == sum(1 for rs in ref.values() for r in rs if not r["labels"])  # no violation
    first = next(r for r in ref["train"] if len(r["labels"]) > 1)
    mask = sum(1 << k for k in first["labels"])
    assert fairlex.decode_bitmask(mask, ecthr.LABELS) == [ecthr.LABELS[k] for k in first["labels"]]


def test_articles_are_read_as_names_and_numbers_as_ids():
    at = dict(what="ecthr", release=ECTHR_RELEASE["labels"], digit_ids=False)
    assert fairlex.bitmask(["2", "P1-1"], ecthr.LABELS, "labels", "x", **at) == 1 | (1 << 9)
    assert fairlex.bitmask([0, 9], ecthr.LABELS, "labels", "x", **at) == 1 | (1 << 9)  # JSON numbers: ids
    assert fairlex.bitmask(["article_14", "10"], ecthr.LABELS, "labels", "x", **at) == (1 << 8) | (1 << 6)
    assert fairlex.bitmask([], ecthr.LABELS, "labels", "x", **at) == 0
    with pytest.raises(CorruptDataError, match=r"unknown labels '4'"):  # never article 8 by position
        fairlex.bitmask(["4"], ecthr.LABELS, "labels", "x", **at)
    with pytest.raises(CorruptDataError, match=r"labels is '2'; expected a list"):
        fairlex.bitmask("2", ecthr.LABELS, "labels", "x", **at)


def test_missing_label_column_and_bad_values_are_named(tmp_path):
    parts = fairlex_parts("ecthr", names=True)
    parts["val"][2] = {"text": "t", "label": 1, "attributes": parts["val"][2]["attributes"]}
    with pytest.raises(CorruptDataError, match=r"val.jsonl record 3 has no 'text'/'labels'"):
        ecthr.load(tmp_path / "c", path=write_fairlex(tmp_path / "a", parts))
    parts = fairlex_parts("ecthr", names=True)
    parts["test"][0]["attributes"]["applicant_age"] = "<=99"
    with pytest.raises(CorruptDataError, match=r"unknown applicant_age '<=99'"):
        ecthr.load(tmp_path / "c", path=write_fairlex(tmp_path / "b", parts))


def test_the_dataset_is_multilabel_and_groups_by_attributes_only(tmp_path):
    d = _dataset()
    assert is_multilabel(d) and d["label_names"] == list(ecthr.LABELS)
    sets = value_names(d, "label")
    assert isinstance(sets, LabelSets) and len(sets) == 1024 and sets[0] == "none" and sets[3] == "article_2+article_3"
    g = build_groupings(d)
    assert g["groups"].group_names == ["central_eastern_europe", "rest_of_europe"]
    assert g["applicant_gender"].group_names == ["male", "female"]  # n_a left out
    assert g["applicant_age"].group_names == ["upto_35", "upto_65", "over_65"]
    assert build_groupings(_dataset("dataset.attribute=applicant_age"))["groups_with_missing"].group_names[0] == "n_a"
    bad = dict(d, groupings={"groups": {"by": ["label", "applicant_gender"]}})
    with pytest.raises(ConfigError, match="uses `label`, whose values are label sets"):
        build_groupings(bad)
    compose_cfg = compose(["dataset=ecthr"])
    assert compose_cfg.monitor.metric == "val/macro_f1_avg"  # no accuracy is logged for multi-label data
    # the datamodule accepts bitmasks in 0..1023 and counts the groups
    folder = write_fairlex(tmp_path / "e", fairlex_parts("ecthr"))
    dm = GroupDataModule(dataset=_dataset(f"dataset.source.path={folder}", f"dataset.source.cache_dir={tmp_path / 'c'}"))
    df = dm.load_table()
    assert df["label"].max() > 9 and dm.num_labels == 10
    counts = dm.group_counts("applicant_gender")
    assert counts["all"].sum() == int((df["applicant_gender"] > 0).sum())


def test_a_bitmask_past_the_labels_is_refused(tmp_path):
    from subgroup_robustness.data.datamodule import validate_table

    d = _dataset()
    df = pd.DataFrame({"text": ["a"], "label": [1024], "applicant_age": [0], "applicant_gender": [0],
                       "defendant_state": [0], "split": ["train"]})
    with pytest.raises(CorruptDataError, match=r"column 'label' has value\(s\) \['1024'\] outside 0..1023"):
        validate_table(df, d)


def test_the_hub_parquet_export_with_label_lists(tmp_path):
    pytest.importorskip("pyarrow")
    parts = fairlex_parts("ecthr")
    folder = tmp_path / "pq"
    folder.mkdir()
    names = {"train": "train", "val": "validation", "test": "test"}
    for split, rows in parts.items():
        pd.DataFrame([{"text": r["text"], "labels": r["labels"], **r["attributes"]} for r in rows]).to_parquet(
            folder / f"ecthr-{names[split]}.parquet")
    pd.testing.assert_frame_equal(ecthr.load(tmp_path / "c", path=folder),
                                  ecthr.load(tmp_path / "c", path=write_fairlex(tmp_path / "j", parts)))
