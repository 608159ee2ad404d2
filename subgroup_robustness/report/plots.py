"""The paper's figures: worst-group accuracy against model size, coloured by compression family, and a
heatmap of per-group accuracy by setting. Figures are built without pyplot, so they render headless and
in a notebook alike; each function returns the Figure and saves a PNG when given a path."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from subgroup_robustness.report.tables import setting_order

FAMILY_COLORS = {"none": "black", "distillation": "tab:blue", "pruning": "tab:orange",
                 "quantization": "tab:green", "vocabulary": "tab:red", "vocabulary_transfer": "tab:red"}
EXTRA_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def family_colors(families) -> dict[str, str]:
    out, extra = {}, iter(EXTRA_COLORS * 4)
    for f in sorted(set(families)):
        out[f] = FAMILY_COLORS.get(f) or next(extra)
    return out


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
    """Per-group test accuracy (mean over seeds) by setting: rows are settings, columns groups."""
    table = groups.pivot_table(index="setting", columns="group", values="acc", aggfunc="mean", sort=False)
    table = table.loc[sorted(table.index, key=setting_order)]
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
