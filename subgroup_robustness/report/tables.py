"""The paper's tables from a collection of runs: per setting, size, parameters, average, worst-group and
worst-class accuracy as mean ± std over seeds (sample std, ddof=1); the change against the base **and**
against the setting's matched-compute control (``config.compressor.control``: refit, vtc, distill_ce),
each with a paired bootstrap interval (marked * when it excludes zero); prediction flips and KL against the
base; the DFR probe's worst-group accuracy when a run has one; plus a Table-1-style size table. Rows come
in the collection's ``row_order`` (see ``collect.row_order``: derived from the runs, Table 1's order for
the paper's grid).

Flags, with their footnotes under every table:
- ``†`` degenerate runs (``results.json: degenerate``, e.g. one predicted class): shown, never ranked;
- ``‡`` rows whose epoch was re-picked with another selection rule (``--selection``);
- ``{key=value}`` rows whose configuration differs from the table's other rows beyond setting and seed
  (never pooled, compared only with the base and control of the same configuration).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subgroup_robustness.report import selection as sel
from subgroup_robustness.report import significance as sig
from subgroup_robustness.report.collect import BASE, MULTILABEL, MULTILABEL_METRICS, SINGLE_LABEL, Collection

DEGENERATE_MARK = "†"
RESELECTED_MARK = "‡"
NOT_RUN = "control not run"
# per-run metrics averaged over a row's seeds (summary.csv: <name>_mean, <name>_std)
ROW_METRICS = ("acc_avg", "acc_wg", "acc_worst_class", "acc_mean_group", "acc_balanced", "ece", "flip_rate",
               "flip_c2w", "flip_w2c", "kl", "probe_acc_avg", "probe_acc_wg", *MULTILABEL_METRICS)


def _std(x: pd.Series) -> float:
    x = pd.to_numeric(pd.Series(x), errors="coerce")
    return float(x.std(ddof=1)) if x.notna().sum() > 1 else math.nan


def _mean(x: pd.Series) -> float:
    x = pd.to_numeric(pd.Series(x), errors="coerce")
    return float(x.mean()) if x.notna().any() else math.nan


def _partner_index(done: pd.DataFrame) -> dict[tuple, list[pd.Series]]:
    """(experiment, dataset, setting name, context, seed) -> completed runs: where a run finds its base and
    its control (same configuration apart from what the label names, same seed)."""
    index: dict[tuple, list[pd.Series]] = {}
    for _, r in done.iterrows():
        index.setdefault((r["experiment"], r["dataset"], r["setting_name"], r["context"], int(r["seed"])), []).append(r)
    return index


def _partner(index: dict[tuple, list[pd.Series]], r: pd.Series, name: str | None) -> pd.Series | None:
    if not isinstance(name, str):
        return None
    cands = index.get((r["experiment"], r["dataset"], name, r["context"], int(r["seed"]))) or []
    same_model = [c for c in cands if c["model_id"] == r["model_id"]]
    return (same_model or cands or [None])[0]


def _is_multilabel(part: pd.DataFrame) -> bool:
    return "task" in part and bool((part["task"] == MULTILABEL).any())


# multi-label rows: Δ of these (run − reference), point estimates over seeds, no interval
F1_DELTAS = {"f1_avg": "macro_f1_avg", "f1_wg": "macro_f1_wg", "gd_f1": "gd_macro_f1"}


def _compare(col: Collection, part: pd.DataFrame, ref_name: str | None, index: dict, *, kind: str, prefix: str,
             n_boot: int, seed: int, confidence: float, fallback: bool) -> tuple[dict[str, Any], list[dict], list]:
    """Δ (this row − reference) per seed and across seeds, with intervals. ``kind``: base | control.
    Returns (summary fields, per-seed significance rows, [(seed, run dir, reference dir)]).

    Multi-label rows (``task: multilabel``): Δ macro-F1 average / worst group / group disparity
    (``<prefix>_f1_avg_*``, ``<prefix>_f1_wg_*``, ``<prefix>_gd_f1_*``), mean ± std over seeds, no interval (the
    bootstrap is of accuracy); their accuracy Δs stay NaN. Without the base run in the report (``fallback``),
    the Δ is against the cached base a compressed run started from: with an interval when that base's
    predictions are on this machine (``base.cache_dir``), else a point Δ from its recorded metrics."""
    multilabel = _is_multilabel(part)
    d_avg, d_wg, pairs, matched, ref_labels = [], [], [], [], []
    d_f1: dict[str, list[float]] = {k: [] for k in F1_DELTAS}
    reselected = False
    cached = 0
    flags: dict[int, list[str]] = {}
    for _, r in part.iterrows():
        ref = _partner(index, r, ref_name)
        s = int(r["seed"])
        if ref is not None and ref["dir"] != r["dir"]:
            if multilabel:
                for k, m in F1_DELTAS.items():
                    d_f1[k].append(r[m] - ref[m])
            else:
                d_avg.append(r["acc_avg"] - ref["acc_avg"])
                d_wg.append(r["acc_wg"] - ref["acc_wg"])
            matched.append((s, r["dir"], ref["dir"]))
            ref_labels.append(ref["setting"])
            flags[s] = ([f"degenerate: {r['degenerate_reasons']}"] if r["degenerate"] else []) + \
                ([f"{kind} degenerate: {ref['degenerate_reasons']}"] if ref["degenerate"] else [])
            if multilabel:
                continue  # no interval for multi-label rows
            again = [col.reselected.get(d) for d in (r["dir"], ref["dir"])]
            if any(a is not None and a.changed for a in again):
                reselected = True  # that epoch's predictions are not saved: no interval
                continue
            pa, pb = col.predictions(r["dir"]), col.predictions(ref["dir"])
            if pa is not None and pb is not None:
                pairs.append((s, pa, pb))
        elif fallback and ref is None and not (
                col.reselected.get(r["dir"]) is not None and col.reselected[r["dir"]].changed):
            # the cached base's own metrics (recorded in the run): a point Δ, and an interval when the cached
            # base's predictions are here
            if multilabel:
                if not math.isnan(r["base_macro_f1_avg"]):
                    for k, m in F1_DELTAS.items():
                        d_f1[k].append(r[m] - r[f"base_{m}"])
                continue
            if math.isnan(r["base_acc_avg"]):
                continue
            d_avg.append(r["acc_avg"] - r["base_acc_avg"])
            d_wg.append(r["acc_wg"] - r["base_acc_wg"])
            base = col.cached_base(r["dir"])
            pa = col.predictions(r["dir"]) if base is not None else None
            if base is not None and pa is not None:
                pairs.append((s, pa, base[1]))
                matched.append((s, r["dir"], base[0]))
                flags[s] = [f"degenerate: {r['degenerate_reasons']}"] if r["degenerate"] else []
                cached += 1
    p = prefix
    out: dict[str, Any] = {
        f"{p}_avg_mean": float(np.mean(d_avg)) if d_avg else math.nan, f"{p}_avg_std": _std(d_avg),
        f"{p}_wg_mean": float(np.mean(d_wg)) if d_wg else math.nan, f"{p}_wg_std": _std(d_wg),
        **{f"{p}_{m}_{k}": math.nan for m in ("avg", "wg") for k in ("lo", "hi")},
        f"{p}_avg_sig": False, f"{p}_wg_sig": False,
        f"{p}_matched": len(matched), f"{p}_n": len(d_avg) + len(d_f1["f1_avg"]), f"{p}_ci_seeds": 0,
        f"{p}_label": ref_labels[0] if ref_labels else "",
        f"{p}_cached": cached,
    }
    for k, vals in d_f1.items():
        out[f"{p}_{k}_mean"] = float(np.mean(vals)) if vals else math.nan
        out[f"{p}_{k}_std"] = _std(vals)
    rows: list[dict[str, Any]] = []
    if pairs and not reselected:
        res = sig.compare(pairs, n_boot=n_boot, seed=seed, confidence=confidence)
        for s_row in res["per_seed"]:
            notes = [n for n in (s_row.pop("note", None), *flags.get(int(s_row["seed"]), [])) if n]
            rows.append({"against": kind, "reference": ref_labels[0] if ref_labels else f"{BASE} (cached)", **s_row,
                         "degenerate": any("degenerate" in n for n in notes), "note": "; ".join(notes)})
        if res["across"]:
            a = res["across"]
            out.update({f"{p}_{m}_{k}": a[f"d_{m}_{k}"] for m in ("avg", "wg") for k in ("lo", "hi", "sig")})
            out[f"{p}_ci_seeds"] = a["seeds"]
    return out, rows, matched


def _fill_flips(col: Collection, part: pd.DataFrame, pairs: list[tuple[Any, str, str]]) -> pd.DataFrame:
    """Flip rate and KL against the base row's run of the same seed, from the predictions, for runs whose
    results.json does not record them (written before flips were recorded, or without a cached base)."""
    todo = {d for d in part.loc[part["flip_rate"].isna(), "dir"]}
    if not todo:
        return part
    from subgroup_robustness.metrics.comparison import kl_divergence

    part = part.copy()
    for _, run_dir, base_dir in pairs:
        if run_dir not in todo:
            continue
        a, b = col.predictions(run_dir), col.predictions(base_dir)
        if a is None or b is None or a.pred is None or b.pred is None:
            continue
        common, ia, ib = np.intersect1d(a.index, b.index, return_indices=True)
        if len(common) != len(a.index) or len(common) != len(b.index) or not len(common):
            continue
        i = part.index[part["dir"] == run_dir][0]
        part.at[i, "flip_rate"] = float(np.mean(a.pred[ia] != b.pred[ib]))
        if a.probs is not None and b.probs is not None and math.isnan(part.at[i, "kl"]):
            try:
                kl = kl_divergence(b.probs[ib].astype(np.float64), a.probs[ia].astype(np.float64))
                part.at[i, "kl"] = float(kl.mean())
            except ValueError:
                pass
    return part


def summarize(col: Collection, n_boot: int = 2000, seed: int = 0,
              confidence: float = sig.CONFIDENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per experiment/dataset/setting, per-seed significance rows). Fills ``col.pairs``."""
    done = col.completed
    index = _partner_index(done)
    rows, seed_rows = [], []
    for (exp, ds, setting), part in done.groupby(["experiment", "dataset", "setting"], sort=False):
        first = part.iloc[0]
        row: dict[str, Any] = {
            "experiment": exp, "dataset": ds, "setting": setting, "setting_name": first["setting_name"],
            "variant": first["variant"] or "", "family": first["family"], "row_order": int(part["row_order"].iloc[0]),
            "model": first["model"], "compressor": first["compressor"],
            "task": first["task"] if isinstance(first.get("task"), str) else SINGLE_LABEL,
            "calibration": first.get("calibration") if isinstance(first.get("calibration"), str) else "",
            "calibration_id": first.get("calibration_id") or "",
            "seeds": int(part["seed"].nunique()),
            "seed_list": ",".join(map(str, sorted(int(s) for s in part["seed"].unique()))),
            "size_mb": _mean(part["size_mb"]), "params": _mean(part["params"]),
        }
        degenerate = part[part["degenerate"]]
        row.update(degenerate=bool(len(degenerate)),
                   degenerate_seeds=",".join(str(int(s)) for s in sorted(degenerate["seed"])),
                   degenerate_note="; ".join(f"seed {int(r['seed'])}: {r['degenerate_reasons'] or 'flagged'}"
                                             for _, r in degenerate.sort_values("seed").iterrows()),
                   reselected=any(col.reselected[d].changed for d in part["dir"] if d in col.reselected),
                   code=", ".join(sorted(set(part["code"].fillna("unknown")))))
        bname = first["base_setting"]
        is_base = first["setting_name"] == bname
        base_fields, base_rows, base_pairs = _compare(
            col, part, None if is_base else bname, index, kind="base", prefix="d", n_boot=n_boot, seed=seed,
            confidence=confidence, fallback=not is_base)
        row.update(base_fields)
        if row["task"] != MULTILABEL:  # a changed label set is not a flip of a class, nor its KL a softmax's
            part = _fill_flips(col, part, base_pairs)
        for m in ROW_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean(part[m]), _std(part[m])
        row.update(base="" if is_base else (base_fields["d_label"] or bname), base_seeds=base_fields["d_n"],
                   ci_seeds=base_fields["d_ci_seeds"],
                   base_degenerate=not is_base and any(
                       (ref := _partner(index, r, bname)) is not None and ref["degenerate"] for _, r in part.iterrows()))
        cname = first["control_setting"] if isinstance(first["control_setting"], str) else None
        control_fields, control_rows, control_pairs = _compare(
            col, part, cname, index, kind="control", prefix="c", n_boot=n_boot, seed=seed + 7919,
            confidence=confidence, fallback=False)
        row.update(control_fields)
        matched = control_fields["c_matched"]
        row.update(control=first["control"] if cname else "",
                   control_setting=(control_fields["c_label"] or cname) if cname else "",
                   control_status="" if not cname else "not run" if matched == 0 else
                   "partial" if matched < row["seeds"] else "ok",
                   control_degenerate=bool(cname) and any(
                       (ref := _partner(index, r, cname)) is not None and ref["degenerate"] for _, r in part.iterrows()),
                   control_seeds=matched)
        for r in (*base_rows, *control_rows):
            seed_rows.append({"experiment": exp, "dataset": ds, "setting": setting, "base": row["base"], **r})
        col.pairs[(exp, ds, setting)] = {"base": base_pairs, "control": control_pairs}
        rows.append(row)
    summary = pd.DataFrame(rows)
    if len(summary):
        summary = summary.sort_values(["experiment", "dataset", "row_order"], kind="stable").reset_index(drop=True)
        sizes = {(r["experiment"], r["dataset"], r["setting"]): r["size_mb"] for _, r in summary.iterrows()}
        summary["size_vs_base"] = [
            r["size_mb"] / sizes.get((r["experiment"], r["dataset"], r["base"] or r["setting"]), math.nan)
            if (r["base"] or r["setting_name"] == BASE) else
            r["size_mb"] / _first_base_size(summary, r) for _, r in summary.iterrows()]
    per_seed = pd.DataFrame(seed_rows)
    return summary.reset_index(drop=True), per_seed


def _first_base_size(summary: pd.DataFrame, r: pd.Series) -> float:
    base = summary[(summary["experiment"] == r["experiment"]) & (summary["dataset"] == r["dataset"])
                   & (summary["setting_name"] == BASE)]
    return float(base["size_mb"].iloc[0]) if len(base) else math.nan


# ---- formatting --------------------------------------------------------------------------------------
def _nan(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def pct(mean: float, std: float = math.nan) -> str:
    if _nan(mean):
        return "—"
    return f"{100 * mean:.2f}" + ("" if _nan(std) else f" ± {100 * std:.2f}")


def delta(mean: float, std: float = math.nan) -> str:
    if _nan(mean):
        return "—"
    return f"{round(100 * mean, 2) + 0.0:+.2f}" + ("" if _nan(std) else f" ± {100 * std:.2f}")


def ci(lo: float, hi: float, significant: bool) -> str:
    if _nan(lo):
        return "—"
    return f"[{round(100 * lo, 2) + 0.0:+.2f}, {round(100 * hi, 2) + 0.0:+.2f}]" + ("*" if significant else "")


def plain(mean: float, std: float = math.nan, digits: int = 4) -> str:
    if _nan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if _nan(std) else f" ± {std:.{digits}f}")


def _col(summary: pd.DataFrame, name: str, default: Any = math.nan) -> pd.Series:
    return summary[name] if name in summary else pd.Series(default, index=summary.index)


def _true(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_)) and bool(x)


def setting_cell(r: pd.Series) -> str:
    marks = (f" {DEGENERATE_MARK}" if _true(r.get("degenerate")) else "") + \
            (f" {RESELECTED_MARK}" if _true(r.get("reselected")) else "")
    return f"{r['setting']}{marks}"


def _control_cell(r: pd.Series) -> str:
    if not r.get("control_setting"):
        return "—"
    name = str(r["control_setting"]) + (f" {DEGENERATE_MARK}" if _true(r.get("control_degenerate")) else "")
    status = r.get("control_status")
    if status == "not run":
        return f"{name} ({NOT_RUN})"
    if status == "partial":
        return f"{name} ({int(r['control_seeds'])} of {int(r['seeds'])} seeds)"
    return name


def _vs_control(r: pd.Series, cell: str) -> str:
    if not r.get("control_setting"):
        return "—"
    return NOT_RUN if r.get("control_status") == "not run" else cell


NOT_FOR_MULTILABEL = "not computed for multi-label"


def multilabel_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-dataset table of a multi-label dataset (ECtHR): macro-F1 average, worst group and group
    disparity (FairLex's std over groups) with micro-F1 beside them, all in %, and their Δ against the base
    and the control in points (mean ± std over seeds); no interval (``NOT_FOR_MULTILABEL``)."""
    s = summary
    rows = [r for _, r in s.iterrows()]

    def cells(name: str) -> list[str]:
        return [pct(m, d) for m, d in zip(_col(s, f"{name}_mean"), _col(s, f"{name}_std"))]

    def deltas(name: str) -> list[str]:
        return [delta(m, d) for m, d in zip(_col(s, f"{name}_mean"), _col(s, f"{name}_std"))]

    out = pd.DataFrame({
        "Setting": [setting_cell(r) for r in rows],
        "Family": s["family"],
        "Size (MB)": s["size_mb"].map(lambda v: "—" if _nan(v) else f"{v:.2f}"),
        "Params (M)": s["params"].map(lambda v: "—" if _nan(v) else f"{v / 1e6:.2f}"),
        "Seeds": s["seeds"].astype(str),
        "Macro-F1 avg": cells("macro_f1_avg"),
        "Macro-F1 worst group": cells("macro_f1_wg"),
        "Macro-F1 group disparity": cells("gd_macro_f1"),
        "Micro-F1 avg": cells("micro_f1_avg"),
        "Micro-F1 worst group": cells("micro_f1_wg"),
        "Δ macro-F1 avg": deltas("d_f1_avg"),
        "Δ macro-F1 WG": deltas("d_f1_wg"),
        "Δ macro-F1 GD": deltas("d_gd_f1"),
        "Δ 95% CI": [NOT_FOR_MULTILABEL if r.get("base") else "—" for r in rows],
        "Control": [_control_cell(r) for r in rows],
        "Δ macro-F1 WG vs control": [_vs_control(r, delta(r.get("c_f1_wg_mean"), r.get("c_f1_wg_std"))) for r in rows],
    })
    return out.reset_index(drop=True)


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-dataset table as strings (accuracies in %, Δ in percentage points). The probe's column is
    there only when a row has a probe. A multi-label dataset's table shows macro-F1 instead
    (``multilabel_table``)."""
    if _is_multilabel(summary):
        return multilabel_table(summary)
    s = summary
    rows = [r for _, r in s.iterrows()]
    out = pd.DataFrame({
        "Setting": [setting_cell(r) for r in rows],
        "Family": s["family"],
        "Size (MB)": s["size_mb"].map(lambda v: "—" if _nan(v) else f"{v:.2f}"),
        "Params (M)": s["params"].map(lambda v: "—" if _nan(v) else f"{v / 1e6:.2f}"),
        "Seeds": s["seeds"].astype(str),
        "Avg acc": [pct(m, d) for m, d in zip(s["acc_avg_mean"], s["acc_avg_std"])],
        "Worst-group acc": [pct(m, d) for m, d in zip(s["acc_wg_mean"], s["acc_wg_std"])],
        "Worst-class acc": [pct(m, d) for m, d in zip(_col(s, "acc_worst_class_mean"), _col(s, "acc_worst_class_std"))],
        "Δ avg": [delta(m, d) for m, d in zip(s["d_avg_mean"], s["d_avg_std"])],
        "Δ avg 95% CI": [ci(lo, hi, x) for lo, hi, x in zip(s["d_avg_lo"], s["d_avg_hi"], s["d_avg_sig"])],
        "Δ WGA": [delta(m, d) for m, d in zip(s["d_wg_mean"], s["d_wg_std"])],
        "Δ WGA 95% CI": [ci(lo, hi, x) for lo, hi, x in zip(s["d_wg_lo"], s["d_wg_hi"], s["d_wg_sig"])],
        "Control": [_control_cell(r) for r in rows],
        "Δ avg vs control": [_vs_control(r, delta(r.get("c_avg_mean"), r.get("c_avg_std"))) for r in rows],
        "Δ avg vs control 95% CI": [_vs_control(r, ci(r.get("c_avg_lo"), r.get("c_avg_hi"), r.get("c_avg_sig")))
                                    for r in rows],
        "Δ WGA vs control": [_vs_control(r, delta(r.get("c_wg_mean"), r.get("c_wg_std"))) for r in rows],
        "Δ WGA vs control 95% CI": [_vs_control(r, ci(r.get("c_wg_lo"), r.get("c_wg_hi"), r.get("c_wg_sig")))
                                    for r in rows],
        "Flip %": [pct(m, d) for m, d in zip(_col(s, "flip_rate_mean"), _col(s, "flip_rate_std"))],
        "KL": [plain(m, d) for m, d in zip(_col(s, "kl_mean"), _col(s, "kl_std"))],
    })
    if "probe_acc_wg_mean" in s and s["probe_acc_wg_mean"].notna().any():
        out["Probe WGA"] = [pct(m, d) for m, d in zip(s["probe_acc_wg_mean"], _col(s, "probe_acc_wg_std"))]
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
            row[f"Size (MB){suffix}"] = f"{r['size_mb'].iloc[0]:.2f}" if len(r) and not _nan(r["size_mb"].iloc[0]) else "—"
            row[f"Params (M){suffix}"] = (f"{r['params'].iloc[0] / 1e6:.2f}"
                                          if len(r) and not _nan(r["params"].iloc[0]) else "—")
            row[f"vs base{suffix}"] = (f"{100 * r['size_vs_base'].iloc[0]:.1f}%"
                                       if len(r) and not _nan(r["size_vs_base"].iloc[0]) else "—")
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
       "td:first-child,td:nth-child(2){text-align:left} p{max-width:70em}")


def to_html(df: pd.DataFrame, title: str, note: str = "", before: str = "") -> str:
    body = df.to_html(index=False, escape=True, border=0)
    paras = "".join(f"<p>{html.escape(p)}</p>" for p in note.split("\n") if p.strip())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h2>{html.escape(title)}</h2>"
            + (f"<p><b>{html.escape(before)}</b></p>" if before else "") + f"{body}{paras}</body></html>\n")


NOTE = ("Accuracies in %, mean ± std over seeds (sample std). Δ: change against the base row of the same "
        "seed, in percentage points (mean ± std over seeds); 95% CI: paired bootstrap over test examples "
        "and seeds; * marks an interval that excludes zero.")
CONTROL_NOTE = ("Control: the setting's matched-compute control (config.compressor.control: the same extra "
                "training without the compression — refit for re-fine-tuned pruning, vtc for vocabulary transfer, "
                "<student>_ce for distillation), the same configuration and seed; Δ vs control isolates the "
                "compression from the extra training. \"control not run\": declared, but no completed run of it "
                "with this row's configuration is in the report. Flip %: test predictions that changed against "
                "the run's base (same seed); KL: mean KL(base ‖ run) of the class probabilities, in nats.")


def selection_line(col: Collection, runs: pd.DataFrame) -> str:
    items = [(r["setting"], int(r["seed"]), col.reselected.get(r["dir"], sel.Reselection("own")),
              sel.monitors(col.records.get(r["dir"]) or {})) for _, r in runs.iterrows()]
    return sel.describe(col.selection, items)


def code_note(runs: pd.DataFrame) -> str:
    """A note when the runs of one table come from different code (package version, git commit, local
    changes), naming which rows come from which."""
    versions = sorted(set(runs["code"].fillna("unknown")))
    if len(versions) <= 1:
        return ""
    parts = []
    for v in versions:
        rows = list(dict.fromkeys(runs.loc[runs["code"].fillna("unknown") == v, "setting"]))
        parts.append(f"{v}: {', '.join(rows)}")
    return ("Code versions differ between the runs of this table (version@commit, +dirty: local changes) — "
            + "; ".join(parts) + ".")


MULTILABEL_NOTE = ("Multi-label dataset: no accuracy. Macro-F1 (the mean over all labels of each label's F1, "
                   "FairLex's definition) and micro-F1 in %, mean ± std over seeds (sample std): avg over all test "
                   "examples, worst group = the lowest group score, group disparity = the standard deviation of the "
                   "group scores (FairLex's GD). Δ: change against the base row of the same seed and configuration, "
                   f"in points (mean ± std over seeds); significance {NOT_FOR_MULTILABEL} (the paired bootstrap is "
                   "of accuracy), nor flips, KL or exemplars.")
CACHED_NOTE = ("Δ vs base of {rows}: the base run is not in this report; compared with the cached fine-tuned base the "
               "run started from (results.json base.cache_dir), its predictions for the interval.")


def table_notes(part: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    notes = [MULTILABEL_NOTE] if _is_multilabel(part) else [NOTE, CONTROL_NOTE]
    cached = part[_col(part, "d_cached", 0).fillna(0).astype(int) > 0]
    if len(cached):
        notes.append(CACHED_NOTE.format(rows=", ".join(map(str, cached["setting"]))))
    for _, r in part[part["degenerate"] == True].iterrows():  # noqa: E712
        notes.append(f"{DEGENERATE_MARK} {r['setting']} is degenerate (never ranked): {r['degenerate_note']}.")
    for b in dict.fromkeys(part.loc[_col(part, "base_degenerate", False) == True, "base"]):  # noqa: E712
        notes.append(f"{DEGENERATE_MARK} the base {b} is degenerate: every Δ vs base against it compares with a broken "
                     "model (never ranked).")
    for _, r in part[_col(part, "control_degenerate", False) == True].iterrows():  # noqa: E712
        notes.append(f"{DEGENERATE_MARK} the control {r['control_setting']} of {r['setting']} is degenerate: read "
                     "its Δ vs control with care.")
    variants = part[part["variant"].astype(bool)] if "variant" in part else part.iloc[0:0]
    if len(variants):
        notes.append("Rows in {…} differ from the other rows of this table in their configuration beyond setting and "
                     "seed; they are never pooled and are compared only with the base and control of the same "
                     "configuration: " + "; ".join(f"{r['setting_name']}: {r['variant']}" for _, r in variants.iterrows())
                     + ".")
    code = code_note(runs)
    if code:
        notes.append(code)
    return notes


def write_tables(summary: pd.DataFrame, out_dir: Path, col: Collection | None = None) -> list[Path]:
    written = []
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        folder = out_dir / "tables" / str(exp)
        folder.mkdir(parents=True, exist_ok=True)
        table = display_table(part)
        title = f"{exp}: {ds}"
        runs = col.completed[(col.completed["experiment"] == exp) & (col.completed["dataset"] == ds)] if col else None
        rule = selection_line(col, runs) if col is not None else ""
        listed = table_notes(part, runs) if runs is not None else [NOTE]
        if col is not None:
            from subgroup_robustness.report.conventions import empty_groups, empty_note

            empty = empty_note(empty_groups(col, exp, ds))
            listed += [empty] if empty else []
        notes = "\n".join(listed)
        (folder / f"{ds}.md").write_text(f"## {title}\n\n" + (f"{rule}\n\n" if rule else "")
                                         + f"{to_markdown(table)}\n" + notes.replace("\n", "\n\n") + "\n",
                                         encoding="utf-8")
        (folder / f"{ds}.html").write_text(to_html(table, title, notes, rule), encoding="utf-8")
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


# ---- headlines: the only ranking, and it never ranks a degenerate row --------------------------------
def headlines(summary: pd.DataFrame) -> list[str]:
    """Per table, in words: which Δ WGA intervals exclude zero against the base and against the control,
    and the largest drop and gain among the compressed rows (the controls are not compressions) —
    degenerate rows, and rows compared with a degenerate base, are listed apart, never ranked."""
    lines: list[str] = []
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        cand = part[(part["base"].astype(bool)) & ~part["degenerate"].astype(bool)
                    & ~_col(part, "base_degenerate", False).astype(bool)]
        lines.append(f"**{exp}: {ds}**")
        if _is_multilabel(part):
            ranked = cand[_col(cand, "d_f1_wg_mean").notna() & (cand["family"] != "control")].sort_values("d_f1_wg_mean")
            if len(ranked) and ranked.iloc[0]["d_f1_wg_mean"] < 0:
                lo = ranked.iloc[0]
                lines.append(f"- largest worst-group macro-F1 drop vs base: {lo['setting']} {delta(lo['d_f1_wg_mean'])} "
                             f"(significance {NOT_FOR_MULTILABEL})")
            if len(ranked) and ranked.iloc[-1]["d_f1_wg_mean"] > 0:
                hi = ranked.iloc[-1]
                lines.append(f"- largest worst-group macro-F1 gain vs base: {hi['setting']} {delta(hi['d_f1_wg_mean'])} "
                             f"(significance {NOT_FOR_MULTILABEL})")
            lines.append("")
            continue
        ranked = cand[cand["d_wg_mean"].notna() & (cand["family"] != "control")].sort_values("d_wg_mean")
        lo, hi = (ranked.iloc[0], ranked.iloc[-1]) if len(ranked) else (None, None)
        if lo is not None and lo["d_wg_mean"] < 0:
            lines.append(f"- largest worst-group drop vs base: {lo['setting']} {delta(lo['d_wg_mean'])} "
                         f"{ci(lo['d_wg_lo'], lo['d_wg_hi'], lo['d_wg_sig'])}")
        if hi is not None and hi["d_wg_mean"] > 0:
            lines.append(f"- largest worst-group gain vs base: {hi['setting']} {delta(hi['d_wg_mean'])} "
                         f"{ci(hi['d_wg_lo'], hi['d_wg_hi'], hi['d_wg_sig'])}")
        with_control = cand[cand["control_setting"].astype(bool)]
        d_sig, c_sig = with_control["d_wg_sig"].astype(bool), with_control["c_wg_sig"].astype(bool)
        both = with_control[d_sig & c_sig]
        base_only = with_control[d_sig & ~c_sig & (with_control["control_status"] != "not run")]
        missing = with_control[with_control["control_status"] == "not run"]
        if len(both):
            lines.append("- Δ WGA excludes zero against the base and against the control: "
                         + ", ".join(f"{r['setting']} ({delta(r['c_wg_mean'])} vs {r['control_setting']})"
                                     for _, r in both.iterrows()))
        if len(base_only):
            lines.append("- Δ WGA excludes zero against the base but not against the control (extra training, not "
                         "compression): " + ", ".join(f"{r['setting']} (vs {r['control_setting']}: "
                                                     f"{ci(r['c_wg_lo'], r['c_wg_hi'], r['c_wg_sig'])})"
                                                     for _, r in base_only.iterrows()))
        if len(missing):
            lines.append(f"- {NOT_RUN}: " + ", ".join(f"{r['setting']} (needs {r['control_setting']})"
                                                   for _, r in missing.iterrows()))
        degenerate = part[part["degenerate"].astype(bool)]
        if len(degenerate):
            lines.append(f"- not ranked, degenerate {DEGENERATE_MARK}: "
                         + ", ".join(f"{r['setting']} ({r['degenerate_note']})" for _, r in degenerate.iterrows()))
        broken_base = part[_col(part, "base_degenerate", False).astype(bool) & ~part["degenerate"].astype(bool)]
        if len(broken_base):
            lines.append("- not ranked, compared with a degenerate base: " + ", ".join(broken_base["setting"]))
        lines.append("")
    return lines
