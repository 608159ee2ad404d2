"""python -m subgroup_robustness.report <sweep or results folder>... [-o OUT] [--n-boot N] [--selection RULE]
[--no-plots] [--no-exemplars] [--no-text]"""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from subgroup_robustness.utils.console import console, error
from subgroup_robustness.utils.errors import UserError


CONSOLE_COLUMNS = ["Setting", "Avg acc", "Worst-group acc", "Δ WGA 95% CI", "Control",
                   "Δ WGA vs control 95% CI", "Flip %"]
# a multi-label dataset's table (no accuracy)
MULTILABEL_CONSOLE_COLUMNS = ["Setting", "Macro-F1 avg", "Macro-F1 worst group", "Macro-F1 group disparity",
                              "Δ macro-F1 WG", "Δ 95% CI", "Control"]


def selection_rules() -> tuple[str, ...]:
    from subgroup_robustness.report.selection import RULES

    return RULES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subgroup_robustness.report",
                                     description="Tables, plots and significance from results.json files.")
    parser.add_argument("paths", nargs="+", help="sweep folders, results folders (e.g. logs) or results.json files")
    parser.add_argument("-o", "--out", help="output folder (default: <first path>/report)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--selection", choices=selection_rules(), default=None,
                        help="re-pick every run's fine-tuning epoch with this validation rule from its per-epoch "
                             "history (val/acc_avg: the paper's; default: the rule each run used)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--no-exemplars", action="store_true", help="no exemplar CSVs or flip tables")
    parser.add_argument("--no-text", action="store_true",
                        help="exemplar CSVs without the examples' texts (no dataset is loaded)")
    args = parser.parse_args(argv)
    if args.n_boot < 100:
        parser.error("--n-boot must be at least 100 for a 95% interval")
    import matplotlib

    matplotlib.use("Agg")
    from subgroup_robustness.report import write_report
    from subgroup_robustness.report.collect import status_counts
    from subgroup_robustness.report.tables import display_table, selection_line

    try:
        rep = write_report(args.paths, args.out, n_boot=args.n_boot, seed=args.seed, plots=not args.no_plots,
                           selection=args.selection, exemplars=not args.no_exemplars, texts=not args.no_text)
    except UserError as exc:
        error(str(exc))
        return 2
    runs, summary = rep["collection"].runs, rep["summary"]
    counts = status_counts(runs)
    console.print("runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for _, r in runs[~runs["status"].isin(["completed", "unreadable"])].iterrows():
        err = r["error"] if isinstance(r["error"], str) else ""
        console.print(f"  [yellow]{r['status']}[/yellow] " + escape(f"{r['setting']} seed {r['seed']} {err} ({r['dir']})"),
                      soft_wrap=True)
    for problem in rep["problems"]:  # one line per file skipped (or used only in part)
        console.print("  [yellow]skipped[/yellow] " + escape(problem), soft_wrap=True)
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True) if len(summary) else []:
        from rich.table import Table

        table = Table(title=f"{exp}: {ds}", title_justify="left")
        shown = display_table(part)
        shown = shown[[c for c in (MULTILABEL_CONSOLE_COLUMNS if "Macro-F1 avg" in shown else CONSOLE_COLUMNS)
                       if c in shown]]
        for c in shown.columns:
            table.add_column(c, justify="left" if c in ("Setting", "Family", "Control") else "right",
                             overflow="fold")
        for row in shown.itertuples(index=False):
            table.add_row(*map(str, row))
        console.print(table)
        runs_here = rep["collection"].completed
        runs_here = runs_here[(runs_here["experiment"] == exp) & (runs_here["dataset"] == ds)]
        console.print(escape(selection_line(rep["collection"], runs_here)), soft_wrap=True)
        if part["degenerate"].any():
            console.print(escape("† degenerate (never ranked): " + "; ".join(
                f"{r['setting']}: {r['degenerate_note']}" for _, r in part[part["degenerate"]].iterrows())),
                soft_wrap=True)
    for line in rep.get("console_lines", []):  # per-language and calibration tables, one line each
        console.print(escape(line), soft_wrap=True)
    if len(summary):
        console.print("Δ: percentage points against the base (and the setting's matched-compute control) of the same "
                      "seed and configuration; * = 95% interval excludes zero")
    console.print(f"report: {rep['out'] / 'report.md'} ({len(rep['tables'])} tables, {len(rep['plots'])} plots, "
                  f"{len(rep['exemplars'])} exemplar files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
