"""CAIL (FairLex): the imprisonment-term labels as FairLex spells them ("0", "<=12", ...) or as ids, the
attribute choice, the cail.zip download, clear errors, and a whole run."""

from __future__ import annotations

import pandas as pd
import pytest

from subgroup_robustness.data.groups import build_groupings
from subgroup_robustness.data.sources import cail
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from tests.data.fixtures import UNREACHABLE, run_overrides, serve, write_fairlex, zip_fairlex
from tests.data.multilingual_fixtures import fairlex_parts
from tests.helpers import compose, run_in_process


def test_release_labels_as_names_or_ids(tmp_path):
    by_name = cail.load(tmp_path / "c", path=write_fairlex(tmp_path / "n", fairlex_parts("cail", names=True)))
    by_id = cail.load(tmp_path / "c", path=write_fairlex(tmp_path / "i", fairlex_parts("cail", names=False)))
    pd.testing.assert_frame_equal(by_name, by_id)
    assert sorted(by_id["label"].unique()) == list(range(6))
    assert list(by_id.columns) == ["text", "label", "defendant_gender", "court_region", "split"]


@pytest.mark.parametrize("value,expected", [("0", 0), ("<=12", 1), (">120", 5), ("3", 3), (4, 4),
                                            ("over_120_months", 5), ("Beijing", None)])
def test_term_classes(value, expected):
    from subgroup_robustness.data.sources import fairlex

    if expected is None:
        with pytest.raises(CorruptDataError, match=r"unknown label 'Beijing'; FairLex's values are \['0', '<=12'"):
            fairlex.code(value, cail.LABELS, "label", "x", what="cail", release=cail.SPEC.release_labels)
    else:
        assert fairlex.code(value, cail.LABELS, "label", "x", what="cail", release=cail.SPEC.release_labels) == expected


def test_groups_follow_the_attribute():
    d = compose(["dataset=cail"]).dataset
    g = build_groupings(d)
    assert len(g["groups"].group_names) == 12 and g["groups"].group_names[:2] == ["0_months:male", "0_months:female"]
    assert len(g["court_region"].group_names) == 42
    g = build_groupings(compose(["dataset=cail", "dataset.attribute=court_region"]).dataset)
    assert g["groups"].group_names[1] == "0_months:liaoning"


def test_download_from_zenodo_and_offline_failure(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    zip_fairlex(site / "cail.zip", fairlex_parts("cail", names=True))
    with serve(site) as base:
        df = cail.load(tmp_path / "cache", url=f"{base}/cail.zip")
    assert len(df) == 162
    pd.testing.assert_frame_equal(df, cail.load(tmp_path / "cache", url=f"{UNREACHABLE}/cail.zip"))  # cached
    with pytest.raises(DataUnavailableError, match=r"cail: no local copy .*cail.zip"):
        cail.load(tmp_path / "other", url=f"{UNREACHABLE}/cail.zip")


def test_a_label_that_is_not_a_term_is_named(tmp_path):
    parts = fairlex_parts("cail", names=True)
    parts["train"][5]["label"] = "life"
    with pytest.raises(CorruptDataError, match=r"train.jsonl record 6: unknown label 'life'"):
        cail.load(tmp_path / "c", path=write_fairlex(tmp_path / "f", parts))


def test_a_whole_run(tiny_bert_factory, sr_env):
    folder = write_fairlex(sr_env / "cail", fairlex_parts("cail"))
    rec = run_in_process(run_overrides(tiny_bert_factory(6), sr_env / "run", "cail", f"dataset.source.path={folder}"))
    assert rec["status"] == "completed"
    assert len([k for k in rec["metrics"]["test"] if k.startswith("test/count/")]) == 12
    assert "test/court_region/acc_wg" in rec["metrics"]["test"]
