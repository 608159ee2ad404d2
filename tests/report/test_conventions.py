"""Every group convention of a dataset in one report table, from the same predictions: the primary groups,
overlapping masks and the row-duplicated average (labelled inflated), with Δ vs the run's base; groups
without a test example are listed under the tables, never dropped silently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from subgroup_robustness.data.groups import PRIMARY, build_groupings, metadata_columns
from subgroup_robustness.metrics.group_metrics import GroupAccuracy, flatten_metrics
from tests.report.fakes import _jsonable, fake_run, md_table

# CivilComments in miniature: toxic x identity_any (primary), 2 identities x label (WILDS-style masks) and the
# same masks with row duplication; nobody mentions identity b in a toxic comment (an empty group)
CIVIL = {"name": "civil", "label_names": ["non_toxic", "toxic"],
         "attributes": {"identity_any": ["no_identity", "identity"], "a": ["no", "yes"], "b": ["no", "yes"]},
         "groupings": {"groups": {"by": ["label", "identity_any"]},
                       "masks": {"each": ["a", "b"], "by": ["label"]},
                       "rowdup": {"each": ["a", "b"], "by": ["label"], "average": "rows"}}}
# (label, a, b) x count
CELLS = [((0, 0, 0), 40), ((1, 0, 0), 20), ((0, 1, 0), 10), ((1, 1, 0), 10), ((0, 0, 1), 10), ((0, 1, 1), 10)]


def _examples(wrong: dict[tuple, int]):
    meta, hits = [], []
    for (label, a, b), n in CELLS:
        meta += [[label, int(a or b), a, b]] * n
        k = wrong.get((label, a, b), 0)
        hits += [False] * k + [True] * (n - k)
    return np.asarray(meta), np.asarray(hits)


def _score(wrong):
    meta, hits = _examples(wrong)
    out = {}
    for name, g in build_groupings(CIVIL).items():
        m = GroupAccuracy(g.group_names, row_average=g.average == "rows")
        label = torch.as_tensor(meta[:, 0])
        m.update(torch.where(torch.as_tensor(hits), label, 1 - label), label, g.masks(torch.as_tensor(meta)))
        out[name] = m.compute()
    return out


def _write(folder, compressor, family, seed, wrong, base_wrong):
    rec = fake_run(folder, compressor=compressor, family=family, seed=seed)
    res, base = _score(wrong), _score(base_wrong)
    rec["run"]["dataset"] = "civil"
    rec["config"]["dataset"] = CIVIL
    rec["groups"]["test"] = _jsonable(res)
    flat = {}
    for name, r in res.items():
        flat.update(flatten_metrics("test", None if name == PRIMARY else name, r))
    rec["metrics"]["test"] = _jsonable(flat)
    rec["base"] = {"groups": {"test": _jsonable(base)}, "metrics": {"test": _jsonable(flat)}}
    (folder / "results.json").write_text(json.dumps(rec))
    (folder / "predictions.npz").unlink()  # the tables do not need them
    return res


BASE_WRONG = {(1, 1, 0): 2}                      # a:toxic 8/10
COMP_WRONG = {(1, 1, 0): 5, (0, 0, 1): 4}        # a:toxic 5/10, b:non_toxic 6/10


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report

    root = tmp_path_factory.mktemp("conv")
    res = {}
    for s in (1, 2):
        res["base", s] = _write(root / f"base-{s}", "none", "none", s, BASE_WRONG, BASE_WRONG)
        res["pr40", s] = _write(root / f"pr40-{s}", "pr40", "pruning", s, COMP_WRONG, BASE_WRONG)
    rep = write_report(root, tmp_path_factory.mktemp("conv_report"), n_boot=200, plots=False, exemplars=False)
    return rep, res


def test_hand_computed_conventions():
    r = _score(COMP_WRONG)
    # primary: toxic:identity = a:toxic only (10 comments, 5 right); non_toxic:identity = 30 comments, 4 wrong
    assert r["groups"]["acc"] == {"non_toxic:no_identity": 1.0, "non_toxic:identity": 26 / 30,
                                  "toxic:no_identity": 1.0, "toxic:identity": 0.5}
    # masks: b:non_toxic = 20 comments (10 with a, 10 without), 4 wrong; b:toxic is empty
    assert r["masks"]["acc"]["b:non_toxic"] == 16 / 20 and math.isnan(r["masks"]["acc"]["b:toxic"])
    assert r["masks"]["empty"] == ["b:toxic"] and r["masks"]["acc_wg"] == 0.5
    # rows: a:non_toxic 20 + a:toxic 10 + b:non_toxic 20 = 50 rows (the 10 comments with a and b twice, the 60
    # without identity not at all), 9 wrong -> 41/50 against 91/100 over comments
    assert (r["rowdup"]["rows"], r["rowdup"]["acc_avg_rows"], r["groups"]["acc_avg"]) == (50, 41 / 50, 91 / 100)


def test_the_conventions_table(report):
    rep, res = report
    path = rep["out"] / "tables" / "offline_grid" / "civil_conventions.md"
    assert path in rep["tables"]
    rows = md_table(path)
    pr = rows["pr40"]
    assert pr["primary WGA (4 groups)"] == "50.00 ± 0.00" and pr["primary Δ WGA"] == "-30.00 ± 0.00"
    assert pr["masks WGA (4 groups)"] == "50.00 ± 0.00" and pr["masks Δ WGA"] == "-30.00 ± 0.00"
    assert pr["rowdup avg over (example, group) rows — inflated"] == "82.00 ± 0.00"
    assert pr["primary avg over examples"] == "91.00 ± 0.00"  # the same predictions, per comment
    assert rows["base"]["primary Δ WGA"] == "—"
    text = path.read_text()
    assert "not comparable with the per-example average" in text
    assert "masks: b:toxic" in text and "rowdup: b:toxic" in text
    # the main table says which groups were empty, too
    main = (rep["out"] / "tables" / "offline_grid" / "civil.md").read_text()
    assert "Groups without a test example" in main and "masks: b:toxic" in main
    assert (rep["out"] / "conventions.csv").exists()


def test_console_lists_empty_groups_and_labels_the_row_average(capsys):
    from subgroup_robustness.evaluation import worst_group_line
    from subgroup_robustness.utils.console import console, print_group_table

    r = _score(COMP_WRONG)
    line = worst_group_line(r["rowdup"])
    assert "over 3 groups (1 empty, left out of the minimum: b:toxic)" in line
    assert "row-duplicated average 82.00% over 50 (example, group) rows (inflated" in line
    with console.capture() as cap:
        print_group_table("t", r["masks"])
    out = cap.get()
    assert "empty" in out and "1 of 4 groups have no example in this split" in out
    assert metadata_columns(CIVIL) == ["label", "identity_any", "a", "b"]
