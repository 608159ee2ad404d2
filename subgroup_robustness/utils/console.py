"""Rich console output: the config tree at start, the per-group table at the end."""

from __future__ import annotations

import math
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

console = Console(highlight=False)


def print_config_tree(cfg: DictConfig, fields: Sequence[str] = ("dataset", "model", "compressor", "objective",
                                                               "module", "data", "trainer", "seed", "paths"),
                      out: Console | None = None) -> None:
    tree = Tree("config", guide_style="dim")
    for field in fields:
        if field not in cfg:
            continue
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(field).add(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
    (out or console).print(tree)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "absent"
    return f"{100 * x:.2f}"


def print_group_table(title: str, result: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("acc %", justify="right")
    if base:
        table.add_column("base acc %", justify="right")
    worst = result.get("worst_group")
    empty = empty_groups(result)
    for name, acc in result["acc"].items():
        shown = "empty" if name in empty else _fmt(acc)
        row = [name + (" (worst)" if name == worst else ""), str(result["count"][name]), shown]
        if base:
            row.append(_fmt(base["acc"].get(name)))
        table.add_row(*row, style="bold red" if name == worst else ("dim" if name in empty else None))
    table.add_section()
    for key, label in (("acc_avg", "average"), ("acc_wg", "worst-group")):
        if key in result:
            row = [label, str(result.get("n", "")) if key == "acc_avg" else "", _fmt(result[key])]
            if base:
                row.append(_fmt(base.get(key)))
            table.add_row(*row, style="bold")
    console.print(table)
    if empty:
        console.print(f"  {empty_note(empty, len(result['acc']))}")


def empty_groups(result: dict[str, Any]) -> list[str]:
    """The groups without an example in the scored split (``empty``; from the counts for older records)."""
    if "empty" in result:
        return list(result["empty"])
    return [n for n, c in (result.get("count") or {}).items() if not c]


def empty_note(empty: Sequence[str], n_groups: int) -> str:
    return (f"{len(empty)} of {n_groups} groups have no example in this split and are left out of the worst-group "
            f"minimum: {', '.join(empty)}")


def error(message: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
