"""Every group convention of a dataset, side by side, from the same test predictions.

A dataset may define several groupings (``conf/dataset/<name>.yaml: groupings``); every run scores all of them
in the same test pass, so the conventions differ only in how the same predictions are grouped and averaged.
CivilComments has three published ones:

- ``groups`` — the paper's and JTT's 4 disjoint groups (toxic × identity_any); average over comments;
- ``wilds16`` — WILDS' 16 overlapping masks (8 identities × label); a comment with no identity is in no group
  but counts in the average;
- ``rowdup`` — BalancingGroups / SubpopBench: one row per (comment, identity mentioned), the comments with no
  identity left out. Its groups are WILDS' 16, so its worst group is the same; its average
  (``acc_avg_rows``) is over the duplicated rows and is **inflated** relative to the per-comment average: a
  comment mentioning two identities counts twice and the no-identity majority not at all. The table labels it
  so and never puts it next to the per-comment average without that label.

This module writes ``tables/<experiment>/<dataset>_conventions.md`` / ``.html`` (one row per setting: each
grouping's worst-group accuracy, the row-duplicated average where a grouping asks for it, each with its Δ
against the run's own base of the same seed, mean ± std over seeds) for every table whose runs score more
than one grouping, and lists the groups without a test example (``empty``) under every table: they are left
out of the worst-group minimum, and a reader is told which.

Per-language groupings (``per: language``, named ``<name>_<value>``) have their own tables (``languages``) and are
left out here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from subgroup_robustness.data.groups import PRIMARY
from subgroup_robustness.report.collect import Collection, _get, _num
from subgroup_robustness.report.tables import DEGENERATE_MARK, _mean, _std, delta, pct, to_html, to_markdown
from subgroup_robustness.utils.console import empty_groups as result_empty_groups

ROWS_LABEL = "avg over (example, group) rows — inflated"


def _groupings(rec: dict[str, Any]) -> list[str]:
    """The run's test groupings that are conventions (not per-language expansions), primary first."""
    specs = _get(rec, "config", "dataset", "groupings", default={}) or {}
    per = {name for name, spec in specs.items() if isinstance(spec, dict) and spec.get("per")}
    names = list((_get(rec, "groups", "test", default={}) or {}).keys())
    keep = [n for n in names if not any(n.startswith(f"{p}_") for p in per)]
    return [PRIMARY] + [n for n in keep if n != PRIMARY] if PRIMARY in keep else keep


def _values(col: Collection, run_dir: str, rec: dict[str, Any], name: str) -> dict[str, float]:
    """One grouping's worst-group accuracy (and row-duplicated average) of a run, at its selected epoch."""
    res = _get(rec, "groups", "test", name, default={}) or {}
    pre = "test/" if name == PRIMARY else f"test/{name}/"
    out = {"wg": _num(res.get("acc_wg")), "rows": _num(res.get("acc_avg_rows")), "avg": _num(res.get("acc_avg"))}
    again = col.reselected.get(run_dir) if hasattr(col, "reselected") else None
    if again is not None and again.changed:
        out = {"wg": _num(again.test.get(f"{pre}acc_wg")), "rows": _num(again.test.get(f"{pre}acc_avg_rows")),
               "avg": _num(again.test.get("test/acc_avg"))}
    base = _get(rec, "base", "groups", "test", name, default={}) or {}
    out["base_wg"], out["base_rows"], out["base_avg"] = (_num(base.get("acc_wg")), _num(base.get("acc_avg_rows")),
                                                         _num(base.get("acc_avg")))
    return out


def empty_groups(col: Collection, exp: str, ds: str) -> dict[str, list[str]]:
    """Per grouping, the groups with no test example in at least one completed run of (experiment, dataset)."""
    runs = col.completed[(col.completed["experiment"] == exp) & (col.completed["dataset"] == ds)]
    out: dict[str, set[str]] = {}
    for _, r in runs.iterrows():
        for name, res in (_get(col.records.get(r["dir"]) or {}, "groups", "test", default={}) or {}).items():
            if not isinstance(res, dict):
                continue
            empty = result_empty_groups(res)  # records written before ``empty`` existed: from the counts
            if empty:
                out.setdefault(name, set()).update(empty)
    return {k: sorted(v) for k, v in out.items()}


def empty_note(empty: dict[str, list[str]]) -> str:
    if not empty:
        return ""
    parts = [f"{'primary' if g == PRIMARY else g}: {', '.join(names)}" for g, names in empty.items()]
    return ("Groups without a test example (left out of the worst-group minimum, listed here rather than dropped "
            "silently): " + "; ".join(parts) + ".")


def summarize(col: Collection) -> pd.DataFrame:
    """Long table: one row per (experiment, dataset, setting, grouping) with mean ± std over seeds."""
    rows: list[dict[str, Any]] = []
    done = col.completed
    for (exp, ds, setting), part in done.groupby(["experiment", "dataset", "setting"], sort=False):
        recs = [(r, col.records.get(r["dir"]) or {}) for _, r in part.iterrows()]
        names = _groupings(recs[0][1])
        if len(names) < 2:
            continue
        for name in names:
            vals = [_values(col, r["dir"], rec, name) for r, rec in recs if name in (_get(rec, "groups", "test",
                                                                                           default={}) or {})]
            if not vals:
                continue
            res0 = _get(recs[0][1], "groups", "test", name, default={}) or {}
            row = {"experiment": exp, "dataset": ds, "setting": setting, "grouping": name,
                   "row_order": part["row_order"].min(), "seeds": len(vals),
                   "degenerate": bool(part["degenerate"].astype(bool).any()) if "degenerate" in part else False,
                   "groups": len(res0.get("acc") or {}), "row_average": "acc_avg_rows" in res0,
                   "base_run": bool((part["family"] == "none").all()) if "family" in part else False}
            for key in ("wg", "rows", "avg"):
                v = [x[key] for x in vals]
                d = [x[key] - x[f"base_{key}"] for x in vals]
                row[f"{key}_mean"], row[f"{key}_std"] = _mean(v), _std(v)
                row[f"d_{key}_mean"], row[f"d_{key}_std"] = _mean(d), _std(d)
            rows.append(row)
    return pd.DataFrame(rows)


def display(part: pd.DataFrame) -> pd.DataFrame:
    """Wide: a row per setting; per grouping its WGA and Δ vs base (and the labelled row average)."""
    order = list(dict.fromkeys(part["grouping"]))
    out: dict[str, dict[str, str]] = {}
    for _, r in part.sort_values("row_order", kind="stable").iterrows():
        cells = out.setdefault(r["setting"], {"Setting": r["setting"] + (f" {DEGENERATE_MARK}" if r["degenerate"]
                                                                         else ""), "Seeds": str(int(r["seeds"]))})
        label = "primary" if r["grouping"] == PRIMARY else r["grouping"]
        if r["grouping"] == PRIMARY:
            cells["primary avg over examples"] = pct(r["avg_mean"], r["avg_std"])
        cells[f"{label} WGA ({int(r['groups'])} groups)"] = pct(r["wg_mean"], r["wg_std"])
        cells[f"{label} Δ WGA"] = "—" if r["base_run"] else delta(r["d_wg_mean"], r["d_wg_std"])
        if r["row_average"]:
            cells[f"{label} {ROWS_LABEL}"] = pct(r["rows_mean"], r["rows_std"])
    cols = ["Setting", "Seeds"] + [c for g in order for c in dict.fromkeys(
        c for cells in out.values() for c in cells if c.split(" ", 1)[0] == ("primary" if g == PRIMARY else g))]
    return pd.DataFrame([{c: cells.get(c, "") for c in cols} for cells in out.values()], columns=cols)


NOTE = ("Every column comes from the same test predictions of each run, grouped by the dataset's groupings "
        "(conf/dataset/<name>.yaml). WGA: the lowest group accuracy over the groups with test examples, in %, mean ± "
        "std over seeds; Δ WGA: against the run's own base of the same seed, in points. A grouping with "
        f"`average: rows` also shows the '{ROWS_LABEL}' column: the accuracy over one row per (example, group) pair, "
        "the BalancingGroups / SubpopBench convention for CivilComments, which drops the examples in no group and "
        "counts an example once per group it is in; it is not comparable with the per-example average of the "
        "main table.")


def write_tables(conv: pd.DataFrame, out: Path, col: Collection) -> list[Path]:
    written: list[Path] = []
    if not len(conv):
        return written
    for (exp, ds), part in conv.groupby(["experiment", "dataset"], sort=True):
        folder = out / "tables" / str(exp)
        folder.mkdir(parents=True, exist_ok=True)
        table = display(part)
        title = f"{exp}: {ds} — every group convention"
        notes = [NOTE]
        empty = empty_note(empty_groups(col, exp, ds))
        if empty:
            notes.append(empty)
        text = "\n\n".join(notes)
        (folder / f"{ds}_conventions.md").write_text(f"## {title}\n\n{to_markdown(table)}\n{text}\n", encoding="utf-8")
        (folder / f"{ds}_conventions.html").write_text(to_html(table, title, text), encoding="utf-8")
        written += [folder / f"{ds}_conventions.md", folder / f"{ds}_conventions.html"]
    return written
