"""``python -m subgroup_robustness.data [overrides]``: what a dataset config yields, before any training.

It composes the same Hydra config as a run (same overrides: ``dataset=multinli dataset.source.path=...``,
``debug=tiny``, ...), loads the normalized table and prints the label and attribute names (the source
module's vocabulary), the split sizes and, for every grouping, the examples per group and split. Overlapping groupings also show how many examples are in no group.
``--json`` prints the same numbers as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from subgroup_robustness.data.sources.splits import SPLITS
from subgroup_robustness.utils.errors import UserError

USAGE = """usage: python -m subgroup_robustness.data [--json] [hydra overrides ...]

Prints split sizes and per-group counts for the composed dataset config, e.g.
  python -m subgroup_robustness.data                       (the offline default, RedditBias)
  python -m subgroup_robustness.data dataset=multinli dataset.source.path=../shared/data/multinli/dev_matched.jsonl
  python -m subgroup_robustness.data dataset=civilcomments dataset.source.path=<wilds>/civilcomments_v1.0
"""


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The run's own config tree (``utils.compose.compose``: the packaged configs)."""
    from subgroup_robustness.utils.compose import compose

    return compose(overrides)


def summarize(cfg: DictConfig) -> dict[str, Any]:
    """Split sizes and per-group counts (one example may count in several overlapping groups)."""
    from subgroup_robustness.data.datamodule import GroupDataModule

    dm = GroupDataModule(dataset=cfg.dataset, seed=int(cfg.get("seed", 0)))
    df = dm.load_table()
    out: dict[str, Any] = {
        "dataset": dm.name,
        "labels": list(dm.cfg["label_names"]),
        "attributes": {k: list(v) for k, v in (dm.cfg.get("attributes") or {}).items()},
        "split_sizes": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "groupings": {},
    }
    meta = torch.as_tensor(df[dm.columns].to_numpy().copy(), dtype=torch.long)
    for name, grouping in dm.groupings.items():
        counts = dm.group_counts(name)
        none = (~grouping.masks(meta).any(1)).numpy()
        out["groupings"][name] = {
            "disjoint": grouping.disjoint,
            "average": grouping.average,
            "counts": {g: {k: int(v) for k, v in row.items()} for g, row in counts.to_dict(orient="index").items()},
            "in_no_group": {s: int(none[(df["split"] == s).to_numpy()].sum()) for s in SPLITS},
        }
    return out


def render(summary: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from subgroup_robustness.utils.console import console

    total = sum(summary["split_sizes"].values())
    console.print(f"[bold]{summary['dataset']}: labels[/bold] " + escape(", ".join(summary["labels"])), soft_wrap=True)
    for attr, names in summary["attributes"].items():
        console.print(f"[bold]{summary['dataset']}: attribute {attr}[/bold] " + escape(", ".join(names)), soft_wrap=True)
    console.print(f"[bold]{summary['dataset']}: split sizes[/bold]")
    sizes = Table()
    sizes.add_column("split")
    sizes.add_column("examples", justify="right")
    sizes.add_column("share", justify="right")
    for split, n in summary["split_sizes"].items():
        sizes.add_row(split, f"{n:,}", f"{100 * n / total:.1f}%" if total else "-")
    sizes.add_section()
    sizes.add_row("all", f"{total:,}", "")
    console.print(sizes)
    for name, g in summary["groupings"].items():
        kind = "disjoint" if g["disjoint"] else "overlapping: one example may count in several groups"
        if g.get("average") == "rows":
            kind += "; also averaged over one row per (example, group): inflated, BalancingGroups' convention"
        console.print(f"[bold]{summary['dataset']}: grouping '{name}' ({len(g['counts'])} groups, {kind})[/bold]",
                      soft_wrap=True)
        table = Table()
        table.add_column("group")
        for col in (*SPLITS, "all"):
            table.add_column(col, justify="right")
        for group, row in g["counts"].items():
            smallest = min(row[s] for s in SPLITS)
            style = "bold red" if smallest == 0 else None
            table.add_row(group, *(f"{row[c]:,}" for c in (*SPLITS, "all")), style=style)
        none = g["in_no_group"]
        if any(none.values()):
            table.add_section()
            table.add_row("(in no group)", *(f"{none[s]:,}" for s in SPLITS), f"{sum(none.values()):,}", style="dim")
        console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    from subgroup_robustness.utils.console import error
    from subgroup_robustness.utils.env import quiet_third_party

    quiet_third_party()
    try:
        summary = summarize(compose_config(overrides))
    except UserError as exc:
        error(str(exc))
        return 2
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render(summary)
    return 0
