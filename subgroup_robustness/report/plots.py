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
from typing import Any, Iterable

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
                 radius: float = 5.5, rings: int = 12, bars: np.ndarray | None = None, cap_px: float = 3.0,
                 avoid: Iterable[tuple[float, float]] | None = None) -> list:
    """Annotate each point (data coordinates) with its label so that no two labels overlap, no label covers
    a point or an error bar (``bars``: (2, N) lower/upper extents, as ``errorbar``'s ``yerr``), nor any of the
    unlabelled points ``avoid``, and every label stays inside the axes; a label placed away from its point
    gets a thin leader line. The axes' limits must be final. Returns the annotations."""
    renderer = _canvas(ax.figure)
    to_px = ax.transData.transform
    xs, ys, labels = list(xs), list(ys), list(labels)
    keep = [i for i, (x, y) in enumerate(zip(xs, ys)) if not (math.isnan(x) or math.isnan(y))]
    pts = [(float(xs[i]), float(ys[i]), str(labels[i])) for i in keep]
    px = [to_px((x, y)) for x, y, _ in pts]
    frame = ax.get_window_extent(renderer)
    pad = 2.0
    taken = [Bbox.from_extents(p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius) for p in px]
    for x, y in avoid or ():
        if not (math.isnan(float(x)) or math.isnan(float(y))):
            q = to_px((float(x), float(y)))
            taken.append(Bbox.from_extents(q[0] - radius, q[1] - radius, q[0] + radius, q[1] + radius))
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


def _wg_metric(summary: pd.DataFrame) -> tuple[str, str]:
    """(summary column stem, axis words): worst-group accuracy, or macro-F1 for a multi-label dataset."""
    if "task" in summary and (summary["task"] == "multilabel").any():
        return "macro_f1_wg", "worst-group macro-F1"
    return "acc_wg", "worst-group accuracy"


def wga_vs_size(summary: pd.DataFrame, title: str = "", path: str | Path | None = None) -> Figure:
    """One dataset's settings: mean worst-group accuracy (± std over seeds, clipped to [0, 100]) against size
    in MB; degenerate rows hollow; labels placed without overlaps. A multi-label dataset's rows (``task``) plot
    worst-group macro-F1."""
    metric, words = _wg_metric(summary)
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.add_subplot()
    colors = family_colors(summary["family"])
    degenerate = summary["degenerate"].astype(bool) if "degenerate" in summary else pd.Series(False, index=summary.index)
    for fam, part in summary.groupby("family"):
        for hollow in (False, True):
            sub = part[degenerate[part.index] == hollow]
            if not len(sub):
                continue
            mean = 100 * sub[f"{metric}_mean"]
            ax.errorbar(sub["size_mb"], mean, yerr=clipped_yerr(mean, 100 * sub[f"{metric}_std"]),
                        fmt="*" if fam == "none" else "o", ms=12 if fam == "none" else 7, color=colors[fam],
                        mfc="none" if hollow else colors[fam], mew=1.3,
                        label=None if hollow else ("uncompressed" if fam == "none" else fam), capsize=3, lw=1)
    if degenerate.any():
        ax.plot([], [], "o", mfc="none", color="0.3", label="degenerate (hollow, never ranked)")
    handles, entries = ax.get_legend_handles_labels()
    order = sorted(range(len(entries)), key=lambda i: entries[i].startswith("degenerate"))
    names = summary["setting_name"] if "setting_name" in summary else summary["setting"]
    for _, r in summary[names == "base"].iterrows():
        ax.axhline(100 * r[f"{metric}_mean"], color="black", ls="--", lw=0.8, alpha=0.6)
    ax.set_xlabel("model size (MB, serialized state dict)")
    ax.set_ylabel(f"{words} (%)")
    ax.set_title(title or f"{words} vs model size")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -5.0), min(hi, 105.0))
    ax.set_xlim(*ax.get_xlim())
    ax.legend([handles[i] for i in order], [entries[i] for i in order], title="family", fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.subplots_adjust(right=0.74)
    mean = 100 * summary[f"{metric}_mean"]
    place_labels(ax, summary["size_mb"], mean, [s + (" †" if d else "") for s, d in zip(summary["setting"], degenerate)],
                 bars=clipped_yerr(mean, 100 * summary[f"{metric}_std"]))
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
    words = "macro-F1" if "metric" in groups and (groups["metric"] == "macro_f1").any() else "accuracy"
    fig.colorbar(im, ax=ax, label=f"test {words} (%)")
    ax.set_title(title or f"per-group {words} by setting")
    if flagged:
        ax.set_xlabel("† degenerate (a broken model, not a finding)", fontsize=8)
    return _save(fig, path)


LANGUAGE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*", "d", "H", "8"]


def language_colors(languages: Iterable[str]) -> dict[str, Any]:
    """One colour per language (tab10, tab20 beyond ten languages), in the given order."""
    from matplotlib import colormaps

    languages = list(dict.fromkeys(languages))
    cmap = colormaps["tab10" if len(languages) <= 10 else "tab20"]
    return {lang: cmap(i % cmap.N) for i, lang in enumerate(languages)}


def wga_by_language(langs: pd.DataFrame, title: str = "", path: str | Path | None = None,
                    metric_words: str = "worst-group accuracy") -> Figure:
    """One test set's per-language worst-group accuracy (mean ± std over seeds, clipped to [0, 100]) against
    model size: one marker series per language (its own colour and marker) with the base row's level of that
    language as a dashed line of its colour; each setting named once, next to its lowest language; degenerate
    settings hollow and marked †. The languages of one setting sit side by side around its size, and settings
    of equal size (unstructured pruning, the controls) are spread apart a little, in row order; the axis label
    says so. ``langs``: ``languages.summarize`` rows of one table and test set."""
    fig = Figure(figsize=(9.5, 5.8))
    ax = fig.add_subplot()
    langs = langs[langs["wga_mean"].notna()].copy()
    if not len(langs):
        ax.text(0.5, 0.5, "no per-language results", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    order = langs.groupby("setting")["row_order"].min() if "row_order" in langs else None
    settings = _row_sorted(list(dict.fromkeys(langs["setting"])), order)
    languages = list(dict.fromkeys(langs["language"]))
    size = langs.groupby("setting")["size_mb"].mean()
    known = size.dropna()
    span = float(known.max() - known.min()) if len(known) else 0.0
    width = 0.015 * (span or max(float(known.max()) if len(known) else 1.0, 1.0))  # one setting's languages
    by_size: dict[float, list[str]] = {}
    for st in settings:
        by_size.setdefault(round(float(size.get(st, math.nan)), 3), []).append(st)
    x_of: dict[str, float] = {}
    for sz, same in by_size.items():
        for k, st in enumerate(same):
            x_of[st] = sz + (k - (len(same) - 1) / 2) * 1.4 * width
    spread = any(len(v) > 1 for v in by_size.values())
    dodge = {lg: (i - (len(languages) - 1) / 2) * width / max(len(languages) - 1, 1) for i, lg in enumerate(languages)}
    langs["x"] = [x_of[st] + (dodge[lg] if len(languages) > 1 else 0.0)
                  for st, lg in zip(langs["setting"], langs["language"])]
    degenerate = langs["degenerate"].astype(bool) if "degenerate" in langs else pd.Series(False, index=langs.index)
    colors = language_colors(languages)
    names = langs["setting_name"] if "setting_name" in langs else langs["setting"]
    for i, lang in enumerate(languages):
        part = langs[langs["language"] == lang]
        for _, r in part[names[part.index] == "base"].iterrows():
            ax.axhline(100 * r["wga_mean"], color=colors[lang], ls="--", lw=0.8, alpha=0.55)
        for hollow in (False, True):
            sub = part[degenerate[part.index] == hollow]
            if not len(sub):
                continue
            m = 100 * sub["wga_mean"]
            ax.errorbar(sub["x"], m, yerr=clipped_yerr(m, 100 * sub["wga_std"]),
                        fmt=LANGUAGE_MARKERS[i % len(LANGUAGE_MARKERS)], ms=6, color=colors[lang], mfc="none" if hollow else colors[lang], mew=1.2, capsize=2, lw=0.8,
                        label=None if hollow else lang)
    if degenerate.any():
        ax.plot([], [], "o", mfc="none", color="0.3", label="degenerate (hollow, never ranked)")
    if (names == "base").any():
        ax.plot([], [], ls="--", color="0.3", lw=0.8, label="base, per language")
    ax.set_xlabel("model size (MB, serialized state dict)"
                  + ("; a setting's languages side by side" if len(languages) > 1 else "")
                  + ("; settings of equal size spread apart" if spread else ""))
    ax.set_ylabel(f"{metric_words} within the language (%)")
    ax.set_title(title or f"{metric_words} per language vs model size")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -5.0), min(hi, 105.0))
    ax.set_xlim(*ax.get_xlim())
    handles, entries = ax.get_legend_handles_labels()
    rank = sorted(range(len(entries)), key=lambda k: (entries[k].startswith(("degenerate", "base,")), k))
    ax.legend([handles[k] for k in rank], [entries[k] for k in rank], title="language", fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.subplots_adjust(right=0.8)
    lowest = langs.loc[langs.groupby("setting")["wga_mean"].idxmin()].set_index("setting")
    lowest = lowest.loc[[s for s in settings if s in lowest.index]]
    flagged = set(langs.loc[degenerate, "setting"])
    others = [(x, 100 * y) for x, y, st, lg in zip(langs["x"], langs["wga_mean"], langs["setting"], langs["language"])
              if lowest.loc[st, "language"] != lg]
    place_labels(ax, lowest["x"], 100 * lowest["wga_mean"], [s + (" †" if s in flagged else "") for s in lowest.index],
                 avoid=others)
    return _save(fig, path)


def write_plots(summary: pd.DataFrame, groups: pd.DataFrame, out_dir: Path,
                languages: pd.DataFrame | None = None) -> list[Path]:
    written = []
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        folder = out_dir / "plots" / str(exp)
        p = folder / f"wga_vs_size_{ds}.png"
        words = _wg_metric(part)[1]
        wga_vs_size(part, f"{exp}: {ds} — {words} vs size", p)
        written.append(p)
        g = groups[(groups["experiment"] == exp) & (groups["dataset"] == ds)]
        if len(g):
            p = folder / f"group_heatmap_{ds}.png"
            what = "macro-F1" if "metric" in g and (g["metric"] == "macro_f1").any() else "accuracy"
            group_heatmap(g, f"{exp}: {ds} — per-group test {what}", p)
            written.append(p)
    if languages is not None and len(languages):
        from subgroup_robustness.report.languages import file_stem, metric_words

        for (exp, ds, test_set), part in languages.groupby(["experiment", "dataset", "test_set"], sort=True):
            p = out_dir / "plots" / str(exp) / f"wga_by_language_{file_stem(ds, test_set)}.png"
            words = metric_words(part)
            wga_by_language(part, f"{exp}: {ds} ({test_set}) — {words} per language vs size", p, words)
            written.append(p)
    return written
