"""The paper's figures: worst-group accuracy against model size, coloured by compression family, and a
heatmap of per-group accuracy by setting. Figures are built without pyplot, so they render headless and
in a notebook alike; each function returns the Figure and saves a PNG when given a path."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Iterable

import pandas as pd
from matplotlib.figure import Figure

# the paper's families keep the colours of its figures; any other family gets one from PALETTE, picked by
# a hash of its name (the same colour in every figure), so a new compressor family needs no entry here
FAMILY_COLORS = {"none": "black", "distillation": "tab:blue", "pruning": "tab:orange",
                 "quantization": "tab:green", "vocabulary": "tab:red", "vocabulary_transfer": "tab:red"}
PALETTE = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "#393b79", "#8c6d31",
           "#843c39", "#7b4173", "#637939", "#3182bd"]


def family_color(family: str) -> str:
    """A family's colour: fixed for the paper's families, else chosen by a stable hash of the name."""
    return FAMILY_COLORS.get(family) or PALETTE[zlib.crc32(str(family).encode("utf-8")) % len(PALETTE)]


def family_colors(families: Iterable[str]) -> dict[str, str]:
    """Colours for the families of one figure: ``family_color``, except that two families whose hashes
    meet take the next free palette colours (in name order), so a figure never shows one colour twice."""
    out: dict[str, str] = {}
    for f in sorted(set(map(str, families))):
        color = family_color(f)
        if f not in FAMILY_COLORS and color in out.values():
            start = PALETTE.index(color)
            free = [c for c in PALETTE[start:] + PALETTE[:start] if c not in out.values()]
            color = free[0] if free else color
        out[f] = color
    return out


def _row_sorted(index: Iterable[str], order: pd.Series | None) -> list[str]:
    """Settings in the collection's row order (``row_order``), else as given."""
    index = list(index)
    if order is None:
        return index
    return sorted(index, key=lambda s: (order.get(s, math.inf), index.index(s)))


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def wga_vs_size(summary: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """One dataset's settings: mean worst-group accuracy (± std over seeds) against size in MB."""
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    colors = family_colors(summary["family"])
    for fam, part in summary.groupby("family"):
        yerr = (100 * part["acc_wg_std"]).fillna(0)
        ax.errorbar(part["size_mb"], 100 * part["acc_wg_mean"], yerr=yerr, fmt="*" if fam == "none" else "o",
                    ms=12 if fam == "none" else 7, color=colors[fam], label="uncompressed" if fam == "none" else fam, capsize=3, lw=1)
        for _, r in part.iterrows():
            if not math.isnan(r["acc_wg_mean"]):
                ax.annotate(r["setting"], (r["size_mb"], 100 * r["acc_wg_mean"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    base = summary[summary["setting"] == "base"]
    if len(base):
        ax.axhline(100 * base["acc_wg_mean"].iloc[0], color="black", ls="--", lw=0.8, alpha=0.6)
    ax.set_xlabel("model size (MB, serialized state dict)")
    ax.set_ylabel("worst-group accuracy (%)")
    ax.set_title(title or "worst-group accuracy vs model size")
    ax.grid(alpha=0.3)
    ax.legend(title="family", fontsize=8)
    return _save(fig, path)


def group_heatmap(groups: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """Per-group test accuracy (mean over seeds) by setting: rows are settings (in the collection's row order),
    columns groups."""
    table = groups.pivot_table(index="setting", columns="group", values="acc", aggfunc="mean", sort=False)
    order = groups.groupby("setting")["row_order"].min() if "row_order" in groups else None
    table = table.loc[_row_sorted(table.index, order)]
    group_order = list(dict.fromkeys(groups["group"]))
    table = table[[g for g in group_order if g in table.columns]]
    n_rows, n_cols = table.shape
    fig = Figure(figsize=(max(6, 0.9 * n_cols + 2.5), max(3, 0.38 * n_rows + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(100 * table.to_numpy(dtype=float), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(n_cols), labels=list(table.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), labels=list(table.index), fontsize=8)
    for i in range(n_rows):
        for j in range(n_cols):
            v = table.iat[i, j]
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title(title or "per-group accuracy by setting")
    return _save(fig, path)


def write_plots(summary: pd.DataFrame, groups: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        folder = out_dir / "plots" / str(exp)
        p = folder / f"wga_vs_size_{ds}.png"
        wga_vs_size(part, f"{exp}: {ds} — worst-group accuracy vs size", p)
        written.append(p)
        g = groups[(groups["experiment"] == exp) & (groups["dataset"] == ds)]
        if len(g):
            p = folder / f"group_heatmap_{ds}.png"
            group_heatmap(g, f"{exp}: {ds} — per-group test accuracy", p)
            written.append(p)
    return written
