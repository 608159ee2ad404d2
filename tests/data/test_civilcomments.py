"""CivilComments-WILDS: the loader on WILDS' CSV layout, both groupings evaluated against numbers worked
out by hand, the bundle download, and clear failures."""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest
import torch

from subgroup_robustness.data.groups import build_groupings, metadata_columns
from subgroup_robustness.data.sources import civilcomments
from subgroup_robustness.metrics.group_metrics import GroupAccuracy, flatten_metrics
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from tests.data.fixtures import UNREACHABLE, civil_rows, serve, tar_gz, wilds_row, write_wilds_csv
from tests.helpers import compose

# (text, toxicity, identity scores, prediction); all in the test split
HAND = [
    ("r0", 0.9, {"male": 1.0}, 1),
    ("r1", 0.1, {"male": 0.8}, 1),
    ("r2", 0.0, {"male": 1.0, "female": 0.5}, 0),
    ("r3", 0.7, {"female": 1.0}, 0),
    ("r4", 0.5, {"female": 0.6, "black": 0.9}, 1),      # toxicity exactly 0.5 is toxic
    ("r5", 0.2, {"black": 1.0}, 0),
    ("r6", 0.3, {}, 1),                                 # no identity
    ("r7", 0.8, {}, 1),                                 # no identity
    ("r8", 0.4999, {"muslim": 0.4999}, 0),              # below both thresholds: no identity, not toxic
    ("r9", 0.6, {"white": 0.5}, 1),
    ("r10", 0.0, {"LGBTQ": None, "christian": 1.0}, 0),  # a blank (unannotated) identity is absent
    ("r11", 1.0, {"other_religions": 0.6}, 1),
]


def _hand_table(tmp_path):
    rows = [wilds_row(i, text, "test", tox, ids) for i, (text, tox, ids, _) in enumerate(HAND)]
    return civilcomments.load(tmp_path / "cache", path=write_wilds_csv(tmp_path / "all_data_with_identities.csv", rows))


def test_loader_reads_the_wilds_layout(tmp_path):
    rows = civil_rows(40)
    rows[0]["comment_text"] = 'NA'                                    # a comment, not a missing value
    rows[1]["comment_text"] = 'he said "hi",\nthen left, twice'        # quotes, commas, a line break
    rows[2]["comment_text"] = ""
    path = write_wilds_csv(tmp_path / "wilds" / "civilcomments_v1.0" / "all_data_with_identities.csv", rows)
    df = civilcomments.load(tmp_path / "cache", path=tmp_path / "wilds")  # the WILDS root folder works too
    assert list(df.columns) == ["text", "label", "identity_any", *civilcomments.IDENTITIES, "split"]
    assert df["text"].tolist()[:3] == ["NA", 'he said "hi",\nthen left, twice', ""]
    assert df["split"].tolist() == [r["split"] for r in rows]
    assert df["label"].tolist() == [int(float(r["toxicity"]) >= 0.5) for r in rows]
    for ident in civilcomments.IDENTITIES:
        assert df[ident].tolist() == [int(r[ident] != "" and float(r[ident]) >= 0.5) for r in rows], ident
    assert civilcomments.load(tmp_path / "cache", path=path).equals(df)


def test_civilcomments_config_is_the_papers():
    d = compose(["dataset=civilcomments"]).dataset
    assert (d.max_length, d.train.lr, d.train.weight_decay, d.train.batch_size, d.train.max_epochs) == (300, 1e-5, 0.01, 16, 5)
    groupings = build_groupings(d)
    assert groupings["groups"].group_names == ["non_toxic:no_identity", "non_toxic:identity", "toxic:no_identity", "toxic:identity"]
    assert len(groupings["wilds16"].group_names) == 16 and not groupings["wilds16"].disjoint
    # BalancingGroups / SubpopBench's row duplication: WILDS' 16 groups, plus the average over the rows
    assert groupings["rowdup"].group_names == groupings["wilds16"].group_names
    assert (groupings["rowdup"].average, groupings["wilds16"].average, groupings["groups"].average) == ("rows", "examples", "examples")
    assert groupings["wilds16"].group_names[:2] == ["male:non_toxic", "male:toxic"]


def test_the_three_conventions_match_hand_computed_accuracies(tmp_path):
    df = _hand_table(tmp_path)
    cfg = compose(["dataset=civilcomments"]).dataset
    groupings = build_groupings(cfg)
    meta = torch.as_tensor(df[metadata_columns(cfg)].to_numpy().copy(), dtype=torch.long)
    preds = torch.tensor([p for *_, p in HAND])
    target = torch.as_tensor(df["label"].to_numpy().copy())
    assert target.tolist() == [1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1]
    results = {}
    for name, g in groupings.items():
        metric = GroupAccuracy(g.group_names, row_average=g.average == "rows")
        metric.update(preds[:7], target[:7], g.masks(meta[:7]))  # two batches, as in an epoch
        metric.update(preds[7:], target[7:], g.masks(meta[7:]))
        results[name] = metric.compute()

    w = results["wilds16"]
    expected = {  # accuracy, count; worked out from the table above
        "male:non_toxic": (0.5, 2), "male:toxic": (1.0, 1), "female:non_toxic": (1.0, 1), "female:toxic": (0.5, 2),
        "christian:non_toxic": (1.0, 1), "other_religions:toxic": (1.0, 1), "black:non_toxic": (1.0, 1),
        "black:toxic": (1.0, 1), "white:toxic": (1.0, 1),
    }
    for group in groupings["wilds16"].group_names:
        acc, count = expected.get(group, (math.nan, 0))
        assert w["count"][group] == count, group
        assert (math.isnan(w["acc"][group]) and math.isnan(acc)) or w["acc"][group] == acc, group
    assert w["acc_wg"] == 0.5 and w["acc_avg"] == 9 / 12 and w["n"] == 12  # the no-identity comments count here
    no_identity = groupings["wilds16"].masks(meta).any(1)
    assert (~no_identity).nonzero().flatten().tolist() == [6, 7, 8]  # ... but in none of the 16 groups

    p = results["groups"]
    assert p["count"] == {"non_toxic:no_identity": 2, "non_toxic:identity": 4, "toxic:no_identity": 1, "toxic:identity": 5}
    assert p["acc"] == {"non_toxic:no_identity": 0.5, "non_toxic:identity": 0.75, "toxic:no_identity": 1.0, "toxic:identity": 0.8}
    assert p["acc_wg"] == 0.5 and p["acc_avg"] == 9 / 12
    assert p["empty"] == [] and "acc_avg_rows" not in p and "acc_avg_rows" not in w

    # row duplication: one row per (comment, identity); r2 and r4 count twice, r6-r8 (no identity) not at all:
    # 11 rows, 9 correct (r1 and r3 wrong) -> 9/11, against 9/12 over comments: the inflated average
    r = results["rowdup"]
    assert r["acc_avg_rows"] == 9 / 11 and r["rows"] == 11
    assert (r["acc"], r["count"], r["acc_wg"]) == (w["acc"], w["count"], w["acc_wg"])  # same groups as WILDS'
    # the 7 identity x label cells without a comment are listed as empty, not silently dropped
    assert w["empty"] == r["empty"] == [g for g in groupings["wilds16"].group_names if g not in expected]
    assert len(w["empty"]) == 7
    flat = flatten_metrics("test", "rowdup", r)
    assert flat["test/rowdup/acc_avg_rows"] == 9 / 11 and "test/wilds16/acc_avg_rows" not in flatten_metrics("test", "wilds16", w)
    assert flat["test/rowdup/count/muslim:toxic"] == 0 and "test/rowdup/acc/muslim:toxic" not in flat


def test_bundle_download_is_extracted_and_cached(tmp_path):
    csv_bytes = write_wilds_csv(tmp_path / "src.csv", civil_rows(30)).read_bytes()
    site = tmp_path / "site"
    site.mkdir()
    archive = tar_gz(site / "bundle.tar.gz", {"RELEASE_v1.0.txt": b"", "all_data_with_identities.csv": csv_bytes})
    (site / "cut.tar.gz").write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])
    with serve(site) as base:
        with pytest.raises(CorruptDataError, match="truncated") as info:
            civilcomments.load(tmp_path / "bad", url=f"{base}/cut.tar.gz")
        assert "archive.tar.gz" in str(info.value) and not (tmp_path / "bad" / "archive.tar.gz").exists()
        df = civilcomments.load(tmp_path / "cache", url=f"{base}/bundle.tar.gz")
    assert len(df) == 30 and (tmp_path / "cache" / "all_data_with_identities.csv").read_bytes() == csv_bytes
    assert not (tmp_path / "cache" / "archive.tar.gz").exists()
    pd.testing.assert_frame_equal(df, civilcomments.load(tmp_path / "cache", url=f"{UNREACHABLE}/gone"))


def test_offline_without_data_fails_fast_and_says_what_to_do(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        civilcomments.load(tmp_path / "cache", url=f"{UNREACHABLE}/blob/")
    assert time.perf_counter() - t0 < 10
    for part in ("civilcomments", "all_data_with_identities.csv", "dataset.source.path"):
        assert part in str(info.value)


def test_broken_files_are_named(tmp_path):
    path = write_wilds_csv(tmp_path / "all_data_with_identities.csv", civil_rows(20))
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    with pytest.raises(CorruptDataError, match="all_data_with_identities.csv.*truncated"):
        civilcomments.load(tmp_path / "c", path=path)
    path.write_bytes(data.replace(b",train,", b",training,", 1))
    with pytest.raises(CorruptDataError, match="training"):
        civilcomments.load(tmp_path / "c", path=path)
    rows = civil_rows(5)
    del rows[0]["toxicity"]
    rows[0]["toxicity"] = "high"
    write_wilds_csv(path, rows)
    with pytest.raises(CorruptDataError, match="toxicity"):
        civilcomments.load(tmp_path / "c", path=path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="no all_data_with_identities.csv in"):
        civilcomments.load(tmp_path / "c", path=tmp_path / "empty")
    with pytest.raises(DataUnavailableError, match="does not exist"):
        civilcomments.load(tmp_path / "c", path=tmp_path / "nowhere.csv")


def test_subsampling_keeps_every_groupings_cells(tmp_path):
    """Stratifying on the primary 4 groups alone can empty a WILDS / row-duplication group (a rare identity
    inside a large primary group); strata are the cells of every grouping, so each keeps an example."""
    from subgroup_robustness.data.datamodule import subsample_table
    from subgroup_robustness.data.groups import cells

    rows = [wilds_row(i, f"c{i}", "train", 0.9 if i % 3 == 0 else 0.1, {"male": 1.0} if i % 2 else {})
            for i in range(300)]
    rows[7] = wilds_row(7, "the one", "train", 0.9, {"muslim": 1.0})  # the only toxic comment on muslims
    df = civilcomments.load(tmp_path / "cache", path=write_wilds_csv(tmp_path / "all_data_with_identities.csv", rows))
    cfg = compose(["dataset=civilcomments"]).dataset
    groupings = build_groupings(cfg)
    meta = torch.as_tensor(df[metadata_columns(cfg)].to_numpy().copy(), dtype=torch.long)
    strata = pd.Series(cells(groupings, meta).numpy(), index=df.index)
    for seed in range(5):
        kept = subsample_table(df, {"train": 30}, strata, seed)
        assert "the one" in kept["text"].tolist(), seed
    primary_only = pd.Series(groupings["groups"].group_ids(meta).numpy(), index=df.index)
    lost = [s for s in range(5) if "the one" not in subsample_table(df, {"train": 30}, primary_only, s)["text"].tolist()]
    assert lost  # what the cells prevent: the primary strata alone lose the group for most seeds

    # one disjoint grouping: the cells are its groups, in its order (so such datasets' subsamples are unchanged)
    only = {"groups": groupings["groups"]}
    assert torch.equal(cells(only, meta), groupings["groups"].group_ids(meta))
