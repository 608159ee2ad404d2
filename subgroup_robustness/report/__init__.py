"""Tables, plots, significance and exemplars from any set of results.json files (also in the middle of a
sweep; a bad file is skipped and named, never fatal).

    python -m subgroup_robustness.report logs/offline_grid/multirun     # or: make report  (all of logs/)
    python -m subgroup_robustness.report logs/offline_grid/multirun --selection val/acc_wg

Beyond the dataset tables: per-language tables and plots for runs with per-language groupings
(``languages``), the same method across calibration sources (``calibration``), every group convention of a
dataset from the same predictions (``conventions``: CivilComments' 4 groups, WILDS' 16 masks, row duplication),
and macro-F1 tables for multi-label datasets (``tables.multilabel_table``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from subgroup_robustness.report.collect import Collection, collect, status_counts

__all__ = ["Collection", "collect", "write_report"]


def _status_md(col: Collection, written: dict[str, list[Path]], out: Path, extra: dict[str, list[str]]) -> str:
    runs = col.runs
    counts = status_counts(runs)
    lines = ["# Report", "", "Runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    superseded = int(((runs["status"] == "completed") & ~runs["used"]).sum())
    if superseded:
        lines += [f"{superseded} completed run(s) superseded by a later run of the same setting and seed "
                  "(see `used` in runs.csv).", ""]
    for title, items in extra.items():
        if items:
            lines += [f"## {title}", "", *items, ""]
    for kind in ("tables", "plots", "exemplars"):
        if written.get(kind):
            lines += [f"## {kind.capitalize()}", ""]
            lines += [f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in written[kind]]
            lines.append("")
    pending = runs[runs["status"].isin(["running", "interrupted"])]
    if len(pending):
        lines += ["## Not finished", "", "`running` is a job in progress, or one killed before it could record "
                  "its end: relaunching the sweep re-runs it.", ""]
        lines += [f"- {r['status']}: {r['experiment']} / {r['dataset']} / {r['setting']} / seed {r['seed']} — "
                  f"`{r['dir']}`" for _, r in pending.iterrows()]
        lines.append("")
    failed = runs[~runs["status"].isin(["completed", "running", "interrupted", "unreadable"])]
    if len(failed):
        lines += ["## Failed", ""]
        lines += [f"- {r['experiment']} / {r['dataset']} / {r['setting']} / seed {r['seed']}: {r['error']} — "
                  f"`{r['dir']}`" for _, r in failed.iterrows()]
        lines.append("")
    if col.problems:
        lines += ["## Skipped files", "", "Files the report could not use (or used only in part); the rest of the "
                  "report does not depend on them.", ""]
        lines += [f"- {p}" for p in col.problems]
        lines.append("")
    return "\n".join(lines)


def write_report(paths: Sequence[str | Path] | str | Path, out: str | Path | None = None, *,
                 n_boot: int = 2000, seed: int = 0, plots: bool = True, selection: str | None = None,
                 exemplars: bool = True, texts: bool = True) -> dict[str, Any]:
    """Collect, summarize and write runs.csv, summary.csv, significance.csv, tables, plots, exemplars and
    report.md into ``out`` (default ``<first path>/report``). ``selection``: a validation rule to re-apply
    from the runs' per-epoch history (``val/acc_wg``); None: each run's own. ``texts``: load the datasets
    (local data only) for the exemplars' texts."""
    from subgroup_robustness.report.tables import headlines, selection_line, summarize, write_tables

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    first = Path(paths[0])
    out = Path(out) if out is not None else (first.parent if first.is_file() else first) / "report"
    col = collect(paths, selection=selection)  # first: a wrong path must not leave an empty report folder behind
    out.mkdir(parents=True, exist_ok=True)
    summary, per_seed = summarize(col, n_boot=n_boot, seed=seed)
    col.runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    per_seed.to_csv(out / "significance.csv", index=False)
    written: dict[str, list[Path]] = {"tables": [], "plots": [], "exemplars": []}
    extra: dict[str, list[str]] = {"Model selection": [], "Headlines": [], "Per language": [],
                                   "Calibration sources": [], "Exemplars without text": []}
    languages = cal = None
    console_lines: list[str] = []
    if len(summary):
        from subgroup_robustness.report import calibration, conventions, languages as langs_mod

        written["tables"] = write_tables(summary, out, col)
        for (exp, ds), part in col.completed.groupby(["experiment", "dataset"], sort=True):
            extra["Model selection"].append(f"- {exp} / {ds}: {selection_line(col, part)}")
        extra["Headlines"] = headlines(summary)
        languages = langs_mod.summarize(col, summary, n_boot=n_boot, seed=seed)
        if len(languages):
            languages.to_csv(out / "languages.csv", index=False)
            lang_tables = langs_mod.write_tables(languages, out)
            written["tables"] += lang_tables
            extra["Per language"] = langs_mod.headlines(languages)
            console_lines += [f"per-language table: {p.relative_to(out)}" for p in lang_tables if p.suffix == ".md"]
        conv = conventions.summarize(col)
        if len(conv):
            conv.to_csv(out / "conventions.csv", index=False)
            conv_tables = conventions.write_tables(conv, out, col)
            written["tables"] += conv_tables
            console_lines += [f"group conventions table: {p.relative_to(out)}" for p in conv_tables if p.suffix == ".md"]
        cal = calibration.summarize(col, summary, n_boot=n_boot, seed=seed)
        if len(cal):
            cal.to_csv(out / "calibration.csv", index=False)
            cal_tables = calibration.write_tables(cal, out)
            written["tables"] += cal_tables
            extra["Calibration sources"] = calibration.headlines(cal)
            console_lines += [f"calibration sources table: {p.relative_to(out)}"
                              for p in cal_tables if p.suffix == ".md"]
        if exemplars:
            from subgroup_robustness.report.exemplars import write_exemplars

            ex = write_exemplars(col, summary, out, texts=texts)
            written["exemplars"] = ex["files"]
            written["tables"] += ex["tables"]
            extra["Exemplars without text"] = [f"- {n}" for n in ex["notes"]]
        if plots:
            from subgroup_robustness.report.plots import write_plots

            written["plots"] = write_plots(summary, col.groups(), out, languages)
    (out / "report.md").write_text(_status_md(col, written, out, extra), encoding="utf-8")
    return {"out": out, "collection": col, "summary": summary, "significance": per_seed,
            "languages": languages if languages is not None else pd.DataFrame(),
            "calibration": cal if cal is not None else pd.DataFrame(), "console_lines": console_lines,
            "problems": list(col.problems), **written}
