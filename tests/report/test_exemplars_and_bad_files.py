"""Exemplars (the examples that flip against the base in most seeds, with group and text, from the dataset
re-created from the run's own config) and the groups ranked by flip rate; and a report that never crashes
on one bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.report.fakes import fake_run


# ---- exemplars on the real RedditBias loader (fixture files) --------------------------------------------
@pytest.fixture(scope="module")
def redditbias_spec(redditbias_root, tmp_path_factory):
    from omegaconf import OmegaConf

    from tests.helpers import compose

    cache = tmp_path_factory.mktemp("cache")
    import os

    old = os.environ.get("SR_CACHE_DIR")
    os.environ["SR_CACHE_DIR"] = str(cache)
    try:
        cfg = compose([f"dataset.source.root={redditbias_root}", "dataset.subsample={train: 200, val: 60, test: null}"])
        spec = OmegaConf.to_container(cfg.dataset, resolve=True)
    finally:
        if old is None:
            os.environ.pop("SR_CACHE_DIR", None)
        else:
            os.environ["SR_CACHE_DIR"] = old
    from subgroup_robustness.data.datamodule import GroupDataModule

    dm = GroupDataModule(dataset=spec)
    return spec, dm.load_table(), dm.columns


def write_run(folder: Path, spec: dict, table: pd.DataFrame, columns: list[str], ids: np.ndarray, pred: np.ndarray,
              *, compressor: str = "none", family: str = "none", seed: int = 1, experiment: str = "offline_grid",
              labels: np.ndarray | None = None) -> None:
    """A fake run tested on the dataset table's rows ``ids`` (saved sorted), with ``pred``."""
    fake_run(folder, compressor=compressor, family=family, seed=seed, experiment=experiment)
    rec = json.loads((folder / "results.json").read_text())
    rec["config"]["dataset"] = spec
    (folder / "results.json").write_text(json.dumps(rec))
    meta = table[columns].to_numpy()[ids].astype(np.int16)
    label = table["label"].to_numpy()[ids] if labels is None else labels
    if labels is not None:
        meta[:, columns.index("label")] = labels
    np.savez_compressed(folder / "predictions.npz", index=ids.astype(np.int32), label=label.astype(np.int32),
                        pred=np.asarray(pred, np.int32), metadata=meta, metadata_columns=np.asarray(columns))


def test_exemplars_carry_group_and_text_from_the_runs_own_dataset(redditbias_spec, tmp_path):
    from subgroup_robustness.data.groups import PRIMARY, build_groupings
    from subgroup_robustness.report import write_report

    spec, table, columns = redditbias_spec
    ids = np.flatnonzero(table["split"].to_numpy() == "test")
    label = table["label"].to_numpy()[ids]
    always, once = ids[[3, 10, 20]], ids[[5, 6]]  # flip in both seeds / in one of two
    for s in (1, 2):
        write_run(tmp_path / f"base-{s}", spec, table, columns, ids, label, seed=s)  # the base is always right
        flip = np.isin(ids, always) | (np.isin(ids, once) if s == 1 else False)
        write_run(tmp_path / f"pr40-{s}", spec, table, columns, ids, np.where(flip, 1 - label, label),
                  compressor="pr40", family="pruning", seed=s)
    rep = write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False)
    csv = pd.read_csv(tmp_path / "report" / "exemplars" / "offline_grid" / "redditbias" / "pr40.csv")
    assert list(csv.columns) == ["index", "group", "label", "flips", "seeds", "correct_to_wrong", "wrong_to_correct", "text"]
    assert sorted(csv["index"]) == sorted(always.tolist())  # flipped in most seeds; the one-seed flips are not
    assert (csv["flips"] == 2).all() and (csv["seeds"] == 2).all() and (csv["correct_to_wrong"] == 2).all()
    grouping = build_groupings(spec)[PRIMARY]
    names = dict(zip(grouping.group_names, range(grouping.n_groups)))
    for _, r in csv.iterrows():
        assert r["text"] == table.loc[r["index"], "text"]
        assert r["label"] == spec["label_names"][table.loc[r["index"], "label"]]
        import torch

        mask = grouping.masks(torch.as_tensor(table.loc[[r["index"]], columns].to_numpy(dtype=np.int64)))[0]
        assert bool(mask[names[r["group"]]])
    assert rep["exemplars"] and "Exemplars without text" not in (tmp_path / "report" / "report.md").read_text()
    # groups ranked by flip rate: pooled over the two seeds
    ranking = pd.read_csv(tmp_path / "report" / "exemplars" / "offline_grid" / "redditbias" / "groups_by_flip_rate.csv")
    ranking = ranking[ranking["setting"] == "pr40"].set_index("group")
    df = table.loc[ids]
    for g, row in ranking.iterrows():
        members = ids[grouping.masks(torch.as_tensor(df[columns].to_numpy(dtype=np.int64)))[:, names[g]].numpy()]
        expected = (2 * np.isin(members, always).sum() + np.isin(members, once).sum()) / (2 * len(members))
        assert row["flip"] == pytest.approx(expected) and row["n"] == 2 * len(members)
    assert list(ranking["rank"]) == list(range(1, len(ranking) + 1))
    assert ranking["flip"].is_monotonic_decreasing
    md = (tmp_path / "report" / "tables" / "offline_grid" / "redditbias_flips.md").read_text()
    assert "Groups ranked by flip rate" in md and "| pr40" in md


def test_exemplars_without_text_when_the_data_is_not_the_runs_or_not_here(redditbias_spec, tmp_path):
    from subgroup_robustness.report import write_report

    spec, table, columns = redditbias_spec
    ids = np.flatnonzero(table["split"].to_numpy() == "test")
    wrong = 1 - table["label"].to_numpy()[ids]  # the data changed since the run: its labels are not these
    pred = wrong.copy()
    pred[:4] = 1 - pred[:4]
    write_run(tmp_path / "base", spec, table, columns, ids, wrong, labels=wrong)
    write_run(tmp_path / "dq", spec, table, columns, ids, pred, compressor="dq", family="quantization", labels=wrong)
    # not available locally: an empty cache and no root; the report never downloads
    offline = {**spec, "source": {**spec["source"], "root": None, "cache_dir": str(tmp_path / "empty")}}
    write_run(tmp_path / "o-base", offline, table, columns, ids, table["label"].to_numpy()[ids], experiment="other")
    write_run(tmp_path / "o-dq", offline, table, columns, ids, pred, compressor="dq", family="quantization",
              experiment="other")
    write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "offline_grid / redditbias: exemplars of dq written without text — the dataset loaded here does not match " \
           "the run's test examples (labels differ)" in text
    assert "other / redditbias: exemplars of dq written without text — the dataset could not be loaded here" in text
    assert "never downloads" in text
    for exp in ("offline_grid", "other"):
        csv = pd.read_csv(tmp_path / "report" / "exemplars" / exp / "redditbias" / "dq.csv", keep_default_na=False)
        assert len(csv) >= 4 and (csv["text"] == "").all()
    assert not (tmp_path / "empty" / "_wheel").exists() or not any((tmp_path / "empty" / "_wheel").iterdir())


def test_no_text_option_loads_no_dataset(tmp_path):
    from subgroup_robustness.report import write_report

    fake_run(tmp_path / "base", group_acc=0.8)
    fake_run(tmp_path / "dq", compressor="dq", family="quantization", group_acc=0.6, rng_seed=5)
    write_report(tmp_path, tmp_path / "report", n_boot=100, plots=False, texts=False)
    assert "texts not requested (--no-text)" in (tmp_path / "report" / "report.md").read_text()


# ---- never crash on one bad file -------------------------------------------------------------------------
def test_bad_files_are_skipped_with_one_line_each(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report.__main__ import main

    root = tmp_path / "sweep"
    for s in (1, 2):
        fake_run(root / f"base-{s}", seed=s, group_acc=0.8)
        fake_run(root / f"pr40-{s}", compressor="pr40", family="pruning", seed=s, group_acc=0.6, rng_seed=9 + s)
    fake_run(root / "dq-1", compressor="dq", family="quantization", seed=1, group_acc=0.7)
    fake_run(root / "dq-2", compressor="dq", family="quantization", seed=2, group_acc=0.7)
    bad = {"garbage": b"\x00\xff{{ not json", "truncated": b'{"status": "completed", "run": {"da', "null": b"null",
           "list": b"[1, 2]", "empty": b"",
           "shape": json.dumps({"status": "completed", "run": "x", "metrics": [], "degenerate": "yes"}).encode(),
           "noseed": json.dumps({"status": "completed", "run": {"dataset": "redditbias", "model": "m",
                                                                "compressor": "none"}}).encode()}
    for name, data in bad.items():
        (root / name).mkdir()
        (root / name / "results.json").write_bytes(data)
    (root / "pr40-2" / "predictions.npz").unlink()                                # missing
    (root / "dq-1" / "predictions.npz").write_bytes(b"PK\x03\x04 not a zip at all")  # corrupt
    with np.load(root / "dq-2" / "predictions.npz") as z:                          # ragged arrays
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(root / "dq-2" / "predictions.npz", **{**arrays, "pred": arrays["pred"][:-3]})

    out = tmp_path / "report"
    assert main([str(root), "-o", str(out), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out.replace("\n", "")
    report = (out / "report.md").read_text()
    skipped = report.split("## Skipped files")[1]
    for name in bad:
        path = str(root / name / "results.json")
        assert skipped.count(path) == 1, name
        assert f"skipped {path}" in printed.replace("  ", " ") or path in printed
    for name in ("pr40-2", "dq-1", "dq-2"):
        assert skipped.count(str(root / name / "predictions.npz")) == 1, name
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["status"] == "unreadable").sum() == len(bad)
    # the rest of the report is there: every good run, intervals where the predictions could be read
    summary = pd.read_csv(out / "summary.csv").set_index("setting")
    assert summary.loc["pr40", "seeds"] == 2 and summary.loc["dq", "seeds"] == 2
    assert summary.loc["pr40", "ci_seeds"] == 1 and np.isnan(summary.loc["dq", "d_wg_lo"])
    assert (out / "plots" / "offline_grid" / "wga_vs_size_redditbias.png").exists()
    assert (out / "exemplars" / "offline_grid" / "redditbias" / "pr40.csv").exists()
