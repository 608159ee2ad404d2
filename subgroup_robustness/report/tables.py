"""The paper's tables from a collection of runs: per setting, size, parameters, average and worst-group
accuracy as mean ± std over seeds (sample std, ddof=1), and the change against the base with a
bootstrap interval (marked * when it excludes zero); plus a Table-1-style size table. Rows come in the
collection's ``row_order`` (see ``collect.row_order``: derived from the runs, Table 1's order for the paper's
grid)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subgroup_robustness.report import significance as sig
from subgroup_robustness.report.collect import BASE, Collection

def _std(x: pd.Series) -> float:
    return float(x.std(ddof=1)) if x.notna().sum() > 1 else math.nan


def summarize(col: Collection, n_boot: int = 2000, seed: int = 0,
              confidence: float = sig.CONFIDENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per experiment/dataset/setting, per-seed significance rows)."""
    done = col.completed
    rows, seed_rows = [], []
    pred_cache: dict[str, Any] = {}

    def preds(r: pd.Series):
        if not r["predictions"] or not Path(r["predictions"]).exists():
            return None
        if r["dir"] not in pred_cache:
            dataset_cfg = (col.records[r["dir"]].get("config") or {}).get("dataset")
            try:
                pred_cache[r["dir"]] = sig.load_predictions(r["predictions"], dataset_cfg)
            except Exception:  # noqa: BLE001 - an unreadable file only costs this run its interval
                pred_cache[r["dir"]] = None
        return pred_cache[r["dir"]]

    for (exp, ds, setting), part in done.groupby(["experiment", "dataset", "setting"], sort=False):
        row: dict[str, Any] = {
            "experiment": exp, "dataset": ds, "setting": setting, "family": part["family"].iloc[0],
            "row_order": int(part["row_order"].iloc[0]),
            "model": part["model"].iloc[0], "compressor": part["compressor"].iloc[0],
            "seeds": int(part["seed"].nunique()), "seed_list": ",".join(map(str, sorted(part["seed"].unique()))),
            "size_mb": float(part["size_mb"].mean()), "params": float(part["params"].mean()),
            "acc_avg_mean": float(part["acc_avg"].mean()), "acc_avg_std": _std(part["acc_avg"]),
            "acc_wg_mean": float(part["acc_wg"].mean()), "acc_wg_std": _std(part["acc_wg"]),
        }
        bname = part["base_setting"].iloc[0]
        bases = done[(done["experiment"] == exp) & (done["dataset"] == ds) & (done["setting"] == bname)]
        bases = bases.set_index("seed")
        d_avg, d_wg, pairs = [], [], []
        if setting != bname:
            for _, r in part.iterrows():
                if r["seed"] in bases.index:
                    b = bases.loc[r["seed"]]
                    d_avg.append(r["acc_avg"] - b["acc_avg"])
                    d_wg.append(r["acc_wg"] - b["acc_wg"])
                    pa, pb = preds(r), preds(b)
                    if pa is not None and pb is not None:
                        pairs.append((int(r["seed"]), pa, pb))
                elif not math.isnan(r["base_acc_avg"]):  # the cached base's own metrics: no interval
                    d_avg.append(r["acc_avg"] - r["base_acc_avg"])
                    d_wg.append(r["acc_wg"] - r["base_acc_wg"])
        row.update(base=bname if setting != bname else "",
                   base_seeds=len(d_avg),
                   d_avg_mean=float(np.mean(d_avg)) if d_avg else math.nan, d_avg_std=_std(pd.Series(d_avg, dtype=float)),
                   d_wg_mean=float(np.mean(d_wg)) if d_wg else math.nan, d_wg_std=_std(pd.Series(d_wg, dtype=float)))
        ci = {f"{m}_{k}": math.nan for m in ("d_avg", "d_wg") for k in ("lo", "hi")}
        ci.update(d_avg_sig=False, d_wg_sig=False, ci_seeds=0)
        if pairs:
            res = sig.compare(pairs, n_boot=n_boot, seed=seed, confidence=confidence)
            for s in res["per_seed"]:
                seed_rows.append({"experiment": exp, "dataset": ds, "setting": setting, "base": bname, **s})
            if res["across"]:
                a = res["across"]
                ci.update({k: a[k] for k in ("d_avg_lo", "d_avg_hi", "d_avg_sig", "d_wg_lo", "d_wg_hi", "d_wg_sig")},
                          ci_seeds=a["seeds"])
        row.update(ci)
        rows.append(row)
    summary = pd.DataFrame(rows)
    if len(summary):
        summary = summary.sort_values(["experiment", "dataset", "row_order"], kind="stable")
        base_size = summary[summary["setting"] == BASE].set_index(["experiment", "dataset"])["size_mb"]
        summary["size_vs_base"] = [r["size_mb"] / base_size.get((r["experiment"], r["dataset"]), math.nan)
                                   for _, r in summary.iterrows()]
    return summary.reset_index(drop=True), pd.DataFrame(seed_rows)


# ---- formatting --------------------------------------------------------------------------------------
def pct(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None or math.isnan(std) else f" ± {100 * std:.2f}")


def delta(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{round(100 * mean, 2) + 0.0:+.2f}" + ("" if std is None or math.isnan(std) else f" ± {100 * std:.2f}")


def ci(lo: float, hi: float, significant: bool) -> str:
    if lo is None or math.isnan(lo):
        return "—"
    return f"[{round(100 * lo, 2) + 0.0:+.2f}, {round(100 * hi, 2) + 0.0:+.2f}]" + ("*" if significant else "")


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-dataset table as strings (accuracies in %, Δ in percentage points)."""
    out = pd.DataFrame({
        "Setting": summary["setting"],
        "Family": summary["family"],
        "Size (MB)": summary["size_mb"].map(lambda v: f"{v:.2f}"),
        "Params (M)": summary["params"].map(lambda v: f"{v / 1e6:.2f}"),
        "Seeds": summary["seeds"].astype(str),
        "Avg acc": [pct(m, s) for m, s in zip(summary["acc_avg_mean"], summary["acc_avg_std"])],
        "Worst-group acc": [pct(m, s) for m, s in zip(summary["acc_wg_mean"], summary["acc_wg_std"])],
        "Δ avg": [delta(m, s) for m, s in zip(summary["d_avg_mean"], summary["d_avg_std"])],
        "Δ avg 95% CI": [ci(lo, hi, s) for lo, hi, s in zip(summary["d_avg_lo"], summary["d_avg_hi"], summary["d_avg_sig"])],
        "Δ WGA": [delta(m, s) for m, s in zip(summary["d_wg_mean"], summary["d_wg_std"])],
        "Δ WGA 95% CI": [ci(lo, hi, s) for lo, hi, s in zip(summary["d_wg_lo"], summary["d_wg_hi"], summary["d_wg_sig"])],
    })
    return out.reset_index(drop=True)


def size_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 1 of the paper: size and parameters per setting (one column pair per dataset if they differ)."""
    datasets = list(dict.fromkeys(summary["dataset"]))
    ordered = summary.sort_values("row_order", kind="stable") if "row_order" in summary else summary
    settings = list(dict.fromkeys(ordered["setting"]))
    rows = []
    for s in settings:
        part = summary[summary["setting"] == s]
        row = {"Setting": s, "Family": part["family"].iloc[0]}
        for ds in datasets:
            r = part[part["dataset"] == ds]
            suffix = f" {ds}" if len(datasets) > 1 else ""
            row[f"Size (MB){suffix}"] = f"{r['size_mb'].iloc[0]:.2f}" if len(r) else "—"
            row[f"Params (M){suffix}"] = f"{r['params'].iloc[0] / 1e6:.2f}" if len(r) else "—"
            row[f"vs base{suffix}"] = (f"{100 * r['size_vs_base'].iloc[0]:.1f}%"
                                       if len(r) and not math.isnan(r["size_vs_base"].iloc[0]) else "—")
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    cells = [[str(v).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]) + "\n"


CSS = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:14px} "
       "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3} "
       "td:first-child,td:nth-child(2){text-align:left}")


def to_html(df: pd.DataFrame, title: str, note: str = "") -> str:
    body = df.to_html(index=False, escape=True, border=0)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h2>{html.escape(title)}</h2>"
            f"<p>{html.escape(note)}</p>{body}</body></html>\n")


NOTE = ("Accuracies in %, mean ± std over seeds (sample std). Δ: change against the base row of the same "
        "seed, in percentage points (mean ± std over seeds); 95% CI: paired bootstrap over test examples "
        "and seeds; * marks an interval that excludes zero.")


def write_tables(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        folder = out_dir / "tables" / str(exp)
        folder.mkdir(parents=True, exist_ok=True)
        table = display_table(part)
        title = f"{exp}: {ds}"
        (folder / f"{ds}.md").write_text(f"## {title}\n\n{to_markdown(table)}\n{NOTE}\n", encoding="utf-8")
        (folder / f"{ds}.html").write_text(to_html(table, title, NOTE), encoding="utf-8")
        written += [folder / f"{ds}.md", folder / f"{ds}.html"]
    for exp, part in summary.groupby("experiment", sort=True):
        folder = out_dir / "tables" / str(exp)
        table = size_table(part)
        title = f"{exp}: model size (Table 1)"
        note = "Size: the serialized state dict, as in the paper; Params: float parameters (int8 weights are not counted)."
        (folder / "sizes.md").write_text(f"## {title}\n\n{to_markdown(table)}\n{note}\n", encoding="utf-8")
        (folder / "sizes.html").write_text(to_html(table, title, note), encoding="utf-8")
        written += [folder / "sizes.md", folder / "sizes.html"]
    return written
