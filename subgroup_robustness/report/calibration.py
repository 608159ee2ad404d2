"""Does the calibration data decide who pays? The same method across calibration sources, side by side.

A method that calibrates on training examples (``sq`` with a calibration draw, ``wanda*``, ``sparsegpt*``, ...)
records its draw in ``config.compressor.calibration.source`` (natural | group_balanced | worst_group). Each
source is its own row of the dataset's table (``wanda50``, ``wanda50@group_balanced``,
``wanda50@worst_group``; see ``collect``). When the runs of one method differ **only** in the source
(``calibration_id``: the run identity without ``compressor.calibration.source``, seed set aside), this table
compares them:

- worst-group (and average) accuracy per source, mean ± std over seeds;
- Δ WGA against the base (the dataset table's, with its interval);
- Δ WGA against the same method calibrated on the natural draw, seed by seed on the same test examples, with
  a paired bootstrap interval over examples and seeds (the direct answer: does drawing the calibration
  examples from the minority groups change who pays?).

Written to ``tables/<experiment>/<dataset>_calibration.md`` / ``.html`` and ``calibration.csv``. Degenerate rows
are marked † (never ranked); multi-label rows show macro-F1 and no interval.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subgroup_robustness.report import significance as sig
from subgroup_robustness.report.collect import CALIBRATION_DEFAULT, MULTILABEL, Collection, _source_rank

COLUMNS = ["experiment", "dataset", "method", "source", "setting", "row_order", "family", "degenerate", "task",
           "seeds", "avg_mean", "avg_std", "wg_mean", "wg_std", "base", "d_wg_mean", "d_wg_std", "d_wg_lo",
           "d_wg_hi", "d_wg_sig", "natural", "natural_degenerate", "n_n", "n_wg_mean", "n_wg_std", "n_wg_lo",
           "n_wg_hi", "n_wg_sig", "n_ci_seeds"]


def _std(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def summarize(col: Collection, summary: pd.DataFrame, n_boot: int = 2000, seed: int = 0,
              confidence: float = sig.CONFIDENCE) -> pd.DataFrame:
    """One row per method and calibration source, for the methods run with more than one source."""
    if not len(summary) or "calibration" not in summary or "calibration_id" not in summary:
        return pd.DataFrame(columns=COLUMNS)
    done = col.completed
    rows: list[dict[str, Any]] = []
    cal = summary[summary["calibration"].astype(bool) & summary["calibration_id"].astype(bool)]
    for (exp, ds, cid), part in cal.groupby(["experiment", "dataset", "calibration_id"], sort=True):
        if part["calibration"].nunique() < 2:
            continue
        multilabel = bool((part["task"] == MULTILABEL).any())
        avg, wg = ("macro_f1_avg", "macro_f1_wg") if multilabel else ("acc_avg", "acc_wg")
        dk = "d_f1_wg" if multilabel else "d_wg"
        runs = done[(done["experiment"] == exp) & (done["dataset"] == ds) & (done["calibration_id"] == cid)]
        natural = runs[runs["calibration"] == CALIBRATION_DEFAULT]
        natural_by_seed = {int(r["seed"]): r for _, r in natural.iterrows()}
        natural_setting = natural["setting"].iloc[0] if len(natural) else ""
        natural_degenerate = bool(natural["degenerate"].astype(bool).any()) if len(natural) else False
        part = part.assign(_rank=[_source_rank(c) for c in part["calibration"]]).sort_values("_rank", kind="stable")
        for _, row in part.iterrows():
            mine = runs[runs["setting"] == row["setting"]]
            out: dict[str, Any] = {
                "experiment": exp, "dataset": ds, "method": str(row["setting_name"]).split("@")[0].split(" [")[0],
                "source": row["calibration"], "setting": row["setting"], "row_order": int(row["row_order"]),
                "family": row["family"], "degenerate": bool(row["degenerate"]), "task": row["task"],
                "seeds": int(row["seeds"]), "avg_mean": row[f"{avg}_mean"], "avg_std": row[f"{avg}_std"],
                "wg_mean": row[f"{wg}_mean"], "wg_std": row[f"{wg}_std"], "base": row.get("base") or "",
                "d_wg_mean": row.get(f"{dk}_mean", math.nan), "d_wg_std": row.get(f"{dk}_std", math.nan),
                "d_wg_lo": math.nan if multilabel else row.get("d_wg_lo", math.nan),
                "d_wg_hi": math.nan if multilabel else row.get("d_wg_hi", math.nan),
                "d_wg_sig": False if multilabel else bool(row.get("d_wg_sig", False)),
                "natural": natural_setting, "natural_degenerate": natural_degenerate, "n_n": 0,
                "n_wg_mean": math.nan, "n_wg_std": math.nan,
                "n_wg_lo": math.nan, "n_wg_hi": math.nan, "n_wg_sig": False, "n_ci_seeds": 0,
            }
            if row["calibration"] != CALIBRATION_DEFAULT and natural_by_seed:
                diffs, pairs, reselected = [], [], False
                for _, r in mine.iterrows():
                    ref = natural_by_seed.get(int(r["seed"]))
                    if ref is None:
                        continue
                    diffs.append(r[wg] - ref[wg])
                    if multilabel:
                        continue
                    if any((a := col.reselected.get(d)) is not None and a.changed for d in (r["dir"], ref["dir"])):
                        reselected = True
                        continue
                    pa, pb = col.predictions(r["dir"]), col.predictions(ref["dir"])
                    if pa is not None and pb is not None:
                        pairs.append((int(r["seed"]), pa, pb))
                out.update(n_n=len(diffs), n_wg_mean=float(np.mean(diffs)) if diffs else math.nan, n_wg_std=_std(diffs))
                if pairs and not reselected:
                    res = sig.compare(pairs, n_boot=n_boot, seed=seed + 104729, confidence=confidence)
                    if res["across"] and res["across"]["d_wg"] is not None:
                        a = res["across"]
                        out.update(n_wg_lo=a["d_wg_lo"], n_wg_hi=a["d_wg_hi"], n_wg_sig=a["d_wg_sig"],
                                   n_ci_seeds=a["seeds"])
            rows.append(out)
    return pd.DataFrame(rows, columns=COLUMNS)


def display_table(part: pd.DataFrame) -> pd.DataFrame:
    """Method × source: accuracies (%), Δ WGA vs base and vs the natural draw (points) with 95% intervals."""
    from subgroup_robustness.report.tables import DEGENERATE_MARK, NOT_FOR_MULTILABEL, ci, delta, pct

    multilabel = bool((part["task"] == MULTILABEL).any())
    avg, wg, d = (("Macro-F1 avg", "Macro-F1 worst group", "Δ macro-F1 WG") if multilabel else
                  ("Avg acc", "Worst-group acc", "Δ WGA"))
    out = []
    for _, r in part.iterrows():
        natural = r["source"] == CALIBRATION_DEFAULT
        out.append({
            "Method": r["method"] + (f" {DEGENERATE_MARK}" if r["degenerate"] else ""),
            "Calibration": r["source"], "Row": r["setting"], "Seeds": str(int(r["seeds"])),
            avg: pct(r["avg_mean"], r["avg_std"]), wg: pct(r["wg_mean"], r["wg_std"]),
            f"{d} vs base": delta(r["d_wg_mean"], r["d_wg_std"]),
            "vs base 95% CI": (NOT_FOR_MULTILABEL if multilabel and r["base"] else
                               ci(r["d_wg_lo"], r["d_wg_hi"], r["d_wg_sig"])),
            f"{d} vs natural": "(reference)" if natural else ("natural not run" if not r["natural"] else
                                                              delta(r["n_wg_mean"], r["n_wg_std"])),
            "vs natural 95% CI": "—" if natural or not r["natural"] else (
                NOT_FOR_MULTILABEL if multilabel else ci(r["n_wg_lo"], r["n_wg_hi"], r["n_wg_sig"])),
        })
    return pd.DataFrame(out)


NOTE = ("The same method calibrated on three draws of training examples (config.compressor.calibration.source: "
        "natural = uniform, group_balanced = the same count from every group, worst_group = only the smallest "
        "group), otherwise identical runs. Accuracies in %, mean ± std over seeds. Δ vs base: as in the dataset's "
        "table. Δ vs natural: against the same method calibrated on the natural draw, the same seed and test "
        "examples, in points (mean ± std over seeds); 95% CI: paired bootstrap over test examples and seeds, "
        "* where it excludes zero.")


def write_tables(cal: pd.DataFrame, out_dir: Path) -> list[Path]:
    from subgroup_robustness.report.tables import DEGENERATE_MARK, to_html, to_markdown

    written: list[Path] = []
    if not len(cal):
        return written
    for (exp, ds), part in cal.groupby(["experiment", "dataset"], sort=True):
        part = part.sort_values(["row_order"], kind="stable")
        part = part.assign(_m=part.groupby("method")["row_order"].transform("min")).sort_values(["_m", "row_order"],
                                                                                             kind="stable")
        folder = out_dir / "tables" / str(exp)
        folder.mkdir(parents=True, exist_ok=True)
        table = display_table(part)
        title = f"{exp}: {ds} — the same method across calibration sources"
        notes = [NOTE] + [f"{DEGENERATE_MARK} {r['setting']} is degenerate (never ranked)."
                          for _, r in part[part["degenerate"].astype(bool)].iterrows()]
        broken = part["natural_degenerate"].astype(bool) & (part["source"] != CALIBRATION_DEFAULT)
        notes += [f"{DEGENERATE_MARK} the natural draw {n} is degenerate: the Δ vs natural against it compares with a "
                  "broken model (never ranked)." for n in dict.fromkeys(part.loc[broken, "natural"])]
        md = f"## {title}\n\n{to_markdown(table)}\n" + "\n\n".join(notes) + "\n"
        (folder / f"{ds}_calibration.md").write_text(md, encoding="utf-8")
        (folder / f"{ds}_calibration.html").write_text(to_html(table, title, "\n".join(notes)), encoding="utf-8")
        written += [folder / f"{ds}_calibration.md", folder / f"{ds}_calibration.html"]
    return written


def headlines(cal: pd.DataFrame) -> list[str]:
    """The sources whose Δ WGA against the natural draw excludes zero (non-degenerate rows)."""
    from subgroup_robustness.report.tables import ci, delta

    lines = []
    for (exp, ds), part in cal.groupby(["experiment", "dataset"], sort=True) if len(cal) else []:
        hit = part[part["n_wg_sig"].astype(bool) & ~part["degenerate"].astype(bool)
                   & ~part["natural_degenerate"].astype(bool)]
        text = ", ".join(f"{r['setting']} {delta(r['n_wg_mean'])} {ci(r['n_wg_lo'], r['n_wg_hi'], True)}"
                         for _, r in hit.iterrows())
        lines.append(f"- {exp} / {ds}: calibration source vs natural, interval excludes zero: {text or 'none'}")
    return lines
