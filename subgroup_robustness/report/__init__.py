"""Tables, plots and significance from any set of results.json files (also in the middle of a sweep).

    python -m subgroup_robustness.report logs/offline_grid/multirun     # or: make report  (all of logs/)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from subgroup_robustness.report.collect import Collection, collect, status_counts

__all__ = ["Collection", "collect", "write_report"]


def _status_md(col: Collection, written: dict[str, list[Path]], out: Path) -> str:
    runs = col.runs
    counts = status_counts(runs)
    lines = ["# Report", "", "Runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    superseded = int(((runs["status"] == "completed") & ~runs["used"]).sum())
    if superseded:
        lines += [f"{superseded} completed run(s) superseded by a later run of the same setting and seed "
                  "(see `used` in runs.csv).", ""]
    for kind in ("tables", "plots"):
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
    failed = runs[~runs["status"].isin(["completed", "running", "interrupted"])]
    if len(failed):
        lines += ["## Failed", ""]
        lines += [f"- {r['experiment']} / {r['dataset']} / {r['setting']} / seed {r['seed']}: {r['error']} — "
                  f"`{r['dir']}`" for _, r in failed.iterrows()]
        lines.append("")
    return "\n".join(lines)


def write_report(paths: Sequence[str | Path] | str | Path, out: str | Path | None = None, *,
                 n_boot: int = 2000, seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """Collect, summarize and write runs.csv, summary.csv, significance.csv, tables, plots and
    report.md into ``out`` (default ``<first path>/report``)."""
    from subgroup_robustness.report.tables import summarize, write_tables

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    first = Path(paths[0])
    out = Path(out) if out is not None else (first.parent if first.is_file() else first) / "report"
    col = collect(paths)  # first: a wrong path must not leave an empty report folder behind
    out.mkdir(parents=True, exist_ok=True)
    summary, per_seed = summarize(col, n_boot=n_boot, seed=seed)
    col.runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    per_seed.to_csv(out / "significance.csv", index=False)
    written: dict[str, list[Path]] = {"tables": [], "plots": []}
    if len(summary):
        written["tables"] = write_tables(summary, out)
        if plots:
            from subgroup_robustness.report.plots import write_plots

            written["plots"] = write_plots(summary, col.groups(), out)
    (out / "report.md").write_text(_status_md(col, written, out), encoding="utf-8")
    return {"out": out, "collection": col, "summary": summary, "significance": per_seed, **written}


