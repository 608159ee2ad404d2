"""The paper's figures: worst-group accuracy against model size, coloured by compression family, and a
heatmap of per-group accuracy by setting. Figures are built without pyplot, so they render headless and
in a notebook alike; each function returns the Figure and saves a PNG when given a path.

Degenerate rows (a broken model, not a finding) are drawn hollow and marked † in the heatmap. Error bars
(± std over seeds) are clipped to [0, 100] %. Point labels never overlap one another, the points or the
axes' edge: each is placed at the first free spot on rings around its point (``place_labels``), with a
leader line when it had to move away; matplotlib only."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

# the paper's families keep the colours of its figures; any other family gets one from PALETTE, picked by
# a hash of its name (the same colour in every figure), so a new compressor family needs no entry here
FAMILY_COLORS = {"none": "black", "distillation": "tab:blue", "pruning": "tab:orange",
                 "quantization": "tab:green", "vocabulary": "tab:red", "vocabulary_transfer": "tab:red",
                 "control": "slategray"}
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


def clipped_yerr(mean: pd.Series, std: pd.Series, lo: float = 0.0, hi: float = 100.0) -> np.ndarray:
    """(2, N) asymmetric error bars of ± std that stay within [lo, hi] (a missing std draws none)."""
    m = np.asarray(mean, float)
    s = np.nan_to_num(np.asarray(std, float), nan=0.0)
    return np.stack([np.clip(np.minimum(s, m - lo), 0, None), np.clip(np.minimum(s, hi - m), 0, None)])


def _canvas(fig: Figure):
    """An Agg canvas for a pyplot-free figure, so text sizes can be measured before saving."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


# label offsets around a point, in units of the label's height (dx, dy), tried ring by ring
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1),
               (1, 2), (-1, 2), (1, -2), (-1, -2), (2, 1), (-2, 1), (2, -1), (-2, -1)]


def place_labels(ax, xs: Iterable[float], ys: Iterable[float], labels: Iterable[str], fontsize: float = 7,
                 radius: float = 5.5, rings: int = 12, bars: np.ndarray | None = None, cap_px: float = 3.0) -> list:
    """Annotate each point (data coordinates) with its label so that no two labels overlap, no label covers
    a point or an error bar (``bars``: (2, N) lower/upper extents, as ``errorbar``'s ``yerr``), and every
    label stays inside the axes; a label placed away from its point gets a thin leader line. The axes'
    limits must be final. Returns the annotations."""
    renderer = _canvas(ax.figure)
    to_px = ax.transData.transform
    xs, ys, labels = list(xs), list(ys), list(labels)
    keep = [i for i, (x, y) in enumerate(zip(xs, ys)) if not (math.isnan(x) or math.isnan(y))]
    pts = [(float(xs[i]), float(ys[i]), str(labels[i])) for i in keep]
    px = [to_px((x, y)) for x, y, _ in pts]
    frame = ax.get_window_extent(renderer)
    pad = 2.0
    taken = [Bbox.from_extents(p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius) for p in px]
    if bars is not None:
        for k, i in enumerate(keep):
            lo, hi = float(bars[0][i]), float(bars[1][i])
            if lo > 0 or hi > 0:
                (_, y0), (_, y1) = to_px((pts[k][0], pts[k][1] - lo)), to_px((pts[k][0], pts[k][1] + hi))
                taken.append(Bbox.from_extents(px[k][0] - cap_px, y0 - 1, px[k][0] + cap_px, y1 + 1))
    out = []
    # the most crowded points first: they have the fewest free spots
    crowd = [sum(1 for q in px if abs(q[0] - p[0]) < 60 and abs(q[1] - p[1]) < 30) for p in px]
    for i in sorted(range(len(pts)), key=lambda k: (-crowd[k], k)):
        x, y, text = pts[i]
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        cx, cy = px[i]
        best, best_cost, found = None, math.inf, False
        sx, sy = w / 2 + pad, h + pad
        for ring in range(rings):
            for dx, dy in _DIRECTIONS:
                if dx > 0:
                    left = cx + radius + pad + ring * sx * dx
                elif dx < 0:
                    left = cx - radius - pad - w - ring * sx * -dx
                else:
                    left = cx - w / 2
                near = radius / 2 if dx else radius + pad
                if dy > 0:
                    bottom = cy + near + ring * sy * dy - (h / 2 if dx and ring == 0 and dy == 1 else 0)
                elif dy < 0:
                    bottom = cy - near - h - ring * sy * -dy + (h / 2 if dx and ring == 0 and dy == -1 else 0)
                else:
                    bottom = cy - h / 2
                box = Bbox.from_extents(left - pad / 2, bottom - pad / 2, left + w + pad / 2, bottom + h + pad / 2)
                inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
                overlap = sum(_overlap(box, t) for t in taken)
                if overlap == 0 and inside:  # the first free spot, nearest ring first
                    best, found = (left, bottom, box), True
                    break
                cost = overlap + (0.0 if inside else 1e9)
                if cost < best_cost:  # else the least overlap (an impossibly crowded figure)
                    best, best_cost = (left, bottom, box), cost
            if found:
                break
        left, bottom, box = best
        taken.append(box)
        far = math.hypot(box.x0 + box.width / 2 - cx, box.y0 + box.height / 2 - cy) > 1.5 * (h + radius)
        inv = ax.transData.inverted()
        tx, ty = inv.transform((left, bottom))
        ann = ax.annotate(text, (x, y), xytext=(tx, ty), textcoords="data", fontsize=fontsize, ha="left",
                          va="bottom", annotation_clip=False,
                          arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if far else None)
        out.append(ann)
    return out


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def wga_vs_size(summary: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """One dataset's settings: mean worst-group accuracy (± std over seeds, clipped to [0, 100]) against size
    in MB; degenerate rows hollow; labels placed without overlaps."""
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.add_subplot()
    colors = family_colors(summary["family"])
    degenerate = summary["degenerate"].astype(bool) if "degenerate" in summary else pd.Series(False, index=summary.index)
    for fam, part in summary.groupby("family"):
        for hollow in (False, True):
            sub = part[degenerate[part.index] == hollow]
            if not len(sub):
                continue
            mean = 100 * sub["acc_wg_mean"]
            ax.errorbar(sub["size_mb"], mean, yerr=clipped_yerr(mean, 100 * sub["acc_wg_std"]),
                        fmt="*" if fam == "none" else "o", ms=12 if fam == "none" else 7, color=colors[fam],
                        mfc="none" if hollow else colors[fam], mew=1.3,
                        label=None if hollow else ("uncompressed" if fam == "none" else fam), capsize=3, lw=1)
    if degenerate.any():
        ax.plot([], [], "o", mfc="none", color="0.3", label="degenerate (hollow, never ranked)")
    handles, entries = ax.get_legend_handles_labels()
    order = sorted(range(len(entries)), key=lambda i: entries[i].startswith("degenerate"))
    names = summary["setting_name"] if "setting_name" in summary else summary["setting"]
    for _, r in summary[names == "base"].iterrows():
        ax.axhline(100 * r["acc_wg_mean"], color="black", ls="--", lw=0.8, alpha=0.6)
    ax.set_xlabel("model size (MB, serialized state dict)")
    ax.set_ylabel("worst-group accuracy (%)")
    ax.set_title(title or "worst-group accuracy vs model size")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -5.0), min(hi, 105.0))
    ax.set_xlim(*ax.get_xlim())
    ax.legend([handles[i] for i in order], [entries[i] for i in order], title="family", fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.subplots_adjust(right=0.74)
    mean = 100 * summary["acc_wg_mean"]
    place_labels(ax, summary["size_mb"], mean, [s + (" †" if d else "") for s, d in zip(summary["setting"], degenerate)],
                 bars=clipped_yerr(mean, 100 * summary["acc_wg_std"]))
    return _save(fig, path)


def group_heatmap(groups: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """Per-group test accuracy (mean over seeds) by setting: rows are settings (in the collection's row order),
    columns groups."""
    table = groups.pivot_table(index="setting", columns="group", values="acc", aggfunc="mean", sort=False)
    order = groups.groupby("setting")["row_order"].min() if "row_order" in groups else None
    table = table.loc[_row_sorted(table.index, order)]
    flagged = set(groups.loc[groups["degenerate"].astype(bool), "setting"]) if "degenerate" in groups else set()
    group_order = list(dict.fromkeys(groups["group"]))
    table = table[[g for g in group_order if g in table.columns]]
    n_rows, n_cols = table.shape
    fig = Figure(figsize=(max(6, 0.9 * n_cols + 2.5), max(3, 0.38 * n_rows + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(100 * table.to_numpy(dtype=float), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(n_cols), labels=list(table.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), labels=[f"{s} †" if s in flagged else s for s in table.index], fontsize=8)
    for i in range(n_rows):
        for j in range(n_cols):
            v = table.iat[i, j]
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title(title or "per-group accuracy by setting")
    if flagged:
        ax.set_xlabel("† degenerate (a broken model, not a finding)", fontsize=8)
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
