"""Per-language results: does compression hurt some languages' minority groups more?

A run whose dataset has a per-language grouping (``per: language`` / ``per: decision_language`` in its
config, expanded to ``lang_<code>``: FSCS, XNLI, MHC) records, for its own test set (``test``) and for every
extra test set (``test_<name>``, ``eval_datasets=[...]``), the worst-group accuracy inside each language:
``groups[<prefix>]["lang_<code>"]`` (= ``<prefix>/lang_<code>/acc_wg``; macro-F1 for a multi-label dataset).
From those alone, per table (experiment, dataset) and test set:

- ``summarize``: one row per setting and language: worst-group accuracy within the language, mean ± std
  over seeds, and its change against the base of the same seed and configuration (mean ± std), with a
  paired bootstrap interval over test examples and seeds (``significance.compare`` on the language's own
  groups). The language's group masks are rebuilt from the predictions' saved metadata
  (``predictions.npz``, or ``predictions_<name>.npz`` of an extra test set) with
  ``data.groups.build_groupings`` of the config the set was scored with (``config.dataset``; for an extra
  test set ``eval_datasets[<name>].dataset_config``, else re-composed, see ``Collection.dataset_config``);
  a rebuilt grouping that does not reproduce the recorded worst-group accuracy is not used (the table keeps
  its numbers, the interval is left out and ``report.md`` names the file);
- ``write_tables``: ``tables/<experiment>/<dataset>_languages[_<name>].md`` / ``.html``, the two tables;
- the plot ``plots.wga_by_language`` (one marker series per language against model size).

A language absent from a run (counts 0, ``acc_wg`` null) is "—"; a language absent from every run of a table
is left out and named under it. Degenerate rows are marked † and never ranked (headlines); rows whose epoch
was re-picked (``--selection``) report the re-picked epoch's per-language numbers for ``test`` (from the
history), have no interval, and are marked ‡; extra test sets are scored once, with the epoch the run used.
Multi-label datasets: macro-F1, no interval.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from subgroup_robustness.report import significance as sig
from subgroup_robustness.report.collect import MULTILABEL, Collection

LANG = re.compile(r"^lang_(.+)$")
TOLERANCE = 1e-6  # rebuilt groups vs results.json: the same examples, the same numbers
COLUMNS = ["experiment", "dataset", "test_set", "setting", "setting_name", "family", "row_order", "size_mb",
           "degenerate", "reselected", "metric", "language", "n", "seeds", "wga_mean", "wga_std", "base", "d_n",
           "d_wg_mean", "d_wg_std", "d_wg_lo", "d_wg_hi", "d_wg_sig", "ci_seeds", "note"]


def _num(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def language_sets(rec: dict[str, Any]) -> dict[str, list[str]]:
    """Test set prefix (``test``, ``test_<name>``) -> the language codes of its ``lang_<code>`` groupings."""
    groups = rec.get("groups") if isinstance(rec.get("groups"), dict) else {}
    out: dict[str, list[str]] = {}
    for prefix, groupings in groups.items():
        if not (prefix == "test" or str(prefix).startswith("test_")) or not isinstance(groupings, dict):
            continue
        codes = [m.group(1) for g in groupings if (m := LANG.match(str(g)))]
        if codes:
            out[str(prefix)] = codes
    return out


def file_stem(dataset: str, test_set: str) -> str:
    """``<dataset>`` for the run's own test set, ``<dataset>_<name>`` for the extra test set ``test_<name>``."""
    return str(dataset) if test_set == "test" else f"{dataset}_{test_set[len('test_'):]}"


def metric_words(part: pd.DataFrame) -> str:
    return "worst-group macro-F1" if "metric" in part and (part["metric"] == "macro_f1_wg").any() \
        else "worst-group accuracy"


def _recorded(rec: dict[str, Any], prefix: str, code: str, metric: str, base: bool = False) -> tuple[float, int]:
    """(worst-group metric within the language, its examples) as results.json records them (``base``: the
    cached base's, recorded in the run)."""
    groups = ((rec.get("base") or {}) if base else rec).get("groups") if isinstance(rec, dict) else None
    res = ((groups or {}).get(prefix) or {}).get(f"lang_{code}") if isinstance(groups, dict) else None
    if not isinstance(res, dict):
        return math.nan, 0
    counts = res.get("count") if isinstance(res.get("count"), dict) else {}
    n = int(sum(_num(v) for v in counts.values() if not math.isnan(_num(v))))
    return (_num(res.get(metric)) if n else math.nan), n


class _Masks:
    """Per-language group masks of a run's test set, rebuilt from its predictions (cached per file)."""

    def __init__(self, col: Collection):
        self.col = col
        self.cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def of(self, run_dir: str, prefix: str, dataset_cfg: dict | None, pred=None) -> dict[str, Any] | None:
        """{"pred": Predictions, "masks": {code: (N, G) bool}, "names": {code: group names}} or None."""
        key = (run_dir, prefix)
        if key in self.cache:
            return self.cache[key]
        out = None
        if pred is None:
            pred = self.col.predictions_of(run_dir, prefix, dataset_cfg) if dataset_cfg is not None else None
        if pred is not None and pred.metadata is not None and pred.masks is not None and dataset_cfg is not None:
            import torch

            from subgroup_robustness.data.groups import build_groupings

            try:
                groupings = build_groupings(dataset_cfg)
            except Exception:  # noqa: BLE001 - a config of the wrong shape: no interval
                groupings = {}
            meta = torch.as_tensor(pred.metadata)
            masks, names = {}, {}
            for gname, g in groupings.items():
                m = LANG.match(gname)
                if m and g.within is not None:
                    masks[m.group(1)] = g.masks(meta).numpy()
                    names[m.group(1)] = list(g.group_names)
            out = {"pred": pred, "masks": masks, "names": names}
        self.cache[key] = out
        return out


def _wg(correct: np.ndarray, masks: np.ndarray) -> float:
    n = masks.sum(0)
    if not (n > 0).any():
        return math.nan
    acc = (masks & correct[:, None]).sum(0)[n > 0] / n[n > 0]
    return float(acc.min())


def _sub(pred, masks: np.ndarray) -> sig.Predictions:
    rows = masks.any(1)
    return sig.Predictions(index=pred.index[rows], correct=pred.correct[rows], masks=masks[rows], group_names=[])


def summarize(col: Collection, summary: pd.DataFrame, n_boot: int = 2000, seed: int = 0,
              confidence: float = sig.CONFIDENCE) -> pd.DataFrame:
    """One row per table, test set, setting and language (see the module doc). Needs ``tables.summarize`` to
    have run (``col.pairs``: each row's runs and their bases)."""
    done = col.completed
    masks = _Masks(col)
    rows: list[dict[str, Any]] = []
    if not len(summary) or not len(done):
        return pd.DataFrame(columns=COLUMNS)
    for (exp, ds), table in summary.groupby(["experiment", "dataset"], sort=True):
        runs = done[(done["experiment"] == exp) & (done["dataset"] == ds)]
        sets: dict[str, list[str]] = {}
        for d in runs["dir"]:
            for prefix, codes in language_sets(col.records.get(d) or {}).items():
                listed = sets.setdefault(prefix, [])
                listed += [c for c in codes if c not in listed]
        if not sets:
            continue
        multilabel = bool((table.get("task", pd.Series(dtype=object)) == MULTILABEL).any())
        metric = "macro_f1_wg" if multilabel else "acc_wg"
        for prefix in sorted(sets, key=lambda p: (p != "test", p)):
            for _, row in table.sort_values("row_order", kind="stable").iterrows():
                part = runs[runs["setting"] == row["setting"]]
                pairs = {s: b for s, _, b in (col.pairs.get((exp, ds, row["setting"]), {}).get("base") or [])}
                for code in sets[prefix]:
                    rows.append(_language_row(col, masks, exp, ds, prefix, row, part, pairs, code, metric,
                                              multilabel, n_boot, seed, confidence))
    return pd.DataFrame(rows, columns=COLUMNS)


def _language_row(col: Collection, masks: _Masks, exp: str, ds: str, prefix: str, row: pd.Series,
                  part: pd.DataFrame, pairs: dict[int, str], code: str, metric: str, multilabel: bool,
                  n_boot: int, seed: int, confidence: float) -> dict[str, Any]:
    values, ns, deltas, boot, notes = [], [], [], [], []
    reselected = False
    key = f"{prefix}/lang_{code}/{metric}"
    for _, r in part.sort_values("seed").iterrows():
        rec = col.records.get(r["dir"]) or {}
        v, n = _recorded(rec, prefix, code, metric)
        again = col.reselected.get(r["dir"])
        changed = again is not None and again.changed
        if changed:
            reselected = True
            if prefix == "test":
                v = _num(again.test.get(key)) if n else math.nan
        values.append(v)
        ns.append(n)
        if not row.get("base"):
            continue
        s = int(r["seed"])
        base_dir = pairs.get(s)
        base_rec = col.records.get(base_dir) if base_dir else None
        if base_rec is not None:
            bv, _ = _recorded(base_rec, prefix, code, metric)
            b_again = col.reselected.get(base_dir)
            if b_again is not None and b_again.changed:
                changed = True
                if prefix == "test":
                    bv = _num(b_again.test.get(key))
        else:  # no base run: the cached base's numbers recorded in the run (its own test set only)
            bv, _ = _recorded(rec, prefix, code, metric, base=True)
        if not (math.isnan(v) or math.isnan(bv)):
            deltas.append(v - bv)
        if multilabel or changed or math.isnan(v) or math.isnan(bv):
            continue
        pair = _pair(col, masks, r["dir"], base_dir, prefix, code, v)
        if isinstance(pair, str):
            notes.append(f"seed {s}: {pair}")
        elif pair is not None:
            boot.append((s, *pair))
    n = max(ns) if ns else 0
    present = [v for v in values if not math.isnan(v)]
    out: dict[str, Any] = {
        "experiment": exp, "dataset": ds, "test_set": prefix, "setting": row["setting"],
        "setting_name": row.get("setting_name", row["setting"]), "family": row["family"],
        "row_order": int(row["row_order"]), "size_mb": row["size_mb"], "degenerate": bool(row["degenerate"]),
        "reselected": reselected, "metric": metric, "language": code, "n": n, "seeds": len(present),
        "wga_mean": float(np.mean(present)) if present else math.nan,
        "wga_std": float(np.std(present, ddof=1)) if len(present) > 1 else math.nan,
        "base": row.get("base") or "", "d_n": len(deltas),
        "d_wg_mean": float(np.mean(deltas)) if deltas else math.nan,
        "d_wg_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else math.nan,
        "d_wg_lo": math.nan, "d_wg_hi": math.nan, "d_wg_sig": False, "ci_seeds": 0, "note": "; ".join(notes),
    }
    if boot and not reselected and len(boot) == len(deltas):
        res = sig.compare(boot, n_boot=n_boot, seed=seed + _stable(code), confidence=confidence)
        if res["across"] and res["across"]["d_wg"] is not None:
            a = res["across"]
            out.update(d_wg_lo=a["d_wg_lo"], d_wg_hi=a["d_wg_hi"], d_wg_sig=a["d_wg_sig"], ci_seeds=a["seeds"])
        errors = [f"seed {p['seed']}: {p['error']}" for p in res["per_seed"] if "error" in p]
        if errors:
            out["note"] = "; ".join([*notes, *errors])
    return out


def _stable(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8")) % 10_000


def _pair(col: Collection, masks: _Masks, run_dir: str, base_dir: str | None, prefix: str, code: str,
          recorded: float):
    """(run, base) ``Predictions`` restricted to the language's grouped examples with its group masks; None
    when a file is missing (named in ``problems`` by the collection), or why not as a string."""
    cfg = col.dataset_config(run_dir, prefix)
    if cfg is None:
        return None
    a = masks.of(run_dir, prefix, cfg)
    if a is None or code not in a["masks"]:
        return None if a is None else f"no lang_{code} grouping in the config scored"
    if base_dir is not None and base_dir in col.records:
        b = masks.of(base_dir, prefix, col.dataset_config(base_dir, prefix) or cfg)
    elif prefix == "test" and (cached := col.cached_base(run_dir)) is not None and cached[0] == base_dir:
        b = masks.of(cached[0], prefix, cfg, pred=cached[1])
    else:
        return None
    if b is None or code not in b["masks"]:
        return None
    ma = a["masks"][code]
    rebuilt = _wg(a["pred"].correct, ma)
    if not (abs(rebuilt - recorded) <= TOLERANCE):
        col.problem(f"{Path(run_dir)}: the lang_{code} groups of {prefix} rebuilt from its config give worst-group "
                    f"{rebuilt:.4f}, results.json {recorded:.4f} (the dataset config changed since?); no interval")
        return "rebuilt groups do not reproduce results.json"
    return _sub(a["pred"], ma), _sub(b["pred"], b["masks"][code])


# ---- tables --------------------------------------------------------------------------------------------
def _languages_present(part: pd.DataFrame) -> tuple[list[str], list[str]]:
    order = list(dict.fromkeys(part["language"]))
    n = part.groupby("language")["n"].max()
    return [c for c in order if n.get(c, 0) > 0], [c for c in order if n.get(c, 0) <= 0]


def _marks(row: pd.Series) -> str:
    from subgroup_robustness.report.tables import DEGENERATE_MARK, RESELECTED_MARK

    return (f" {DEGENERATE_MARK}" if row["degenerate"] else "") + (f" {RESELECTED_MARK}" if row["reselected"] else "")


def wga_table(part: pd.DataFrame) -> pd.DataFrame:
    """Settings × languages: worst-group accuracy within each language, mean ± std over seeds (%)."""
    from subgroup_robustness.report.tables import pct

    langs, _ = _languages_present(part)
    n = part.groupby("language")["n"].max()
    out = []
    for setting, rows in part.groupby("setting", sort=False):
        first = rows.iloc[0]
        marks = _marks(first)
        line = {"Setting": f"{setting}{marks}",
                "Size (MB)": "—" if _nan(first["size_mb"]) else f"{first['size_mb']:.2f}",
                "Seeds": str(int(rows["seeds"].max()))}
        by = rows.set_index("language")
        for c in langs:
            r = by.loc[c] if c in by.index else None
            line[f"{c} (n={int(n[c]):,})"] = "—" if r is None else pct(r["wga_mean"], r["wga_std"])
        out.append(line)
    return pd.DataFrame(out)


def delta_table(part: pd.DataFrame) -> pd.DataFrame:
    """Settings × languages: Δ worst-group accuracy within each language against the base (points, mean over
    seeds) with its 95% interval (* = excludes zero)."""
    from subgroup_robustness.report.tables import ci, delta

    langs, _ = _languages_present(part)
    out = []
    for setting, rows in part.groupby("setting", sort=False):
        first = rows.iloc[0]
        if not first["base"]:
            continue
        marks = _marks(first)
        line = {"Setting": f"{setting}{marks}", "Base": first["base"], "Seeds": str(int(rows["d_n"].max()))}
        by = rows.set_index("language")
        for c in langs:
            r = by.loc[c] if c in by.index else None
            if r is None or _nan(r["d_wg_mean"]):
                line[c] = "—"
                continue
            interval = ci(r["d_wg_lo"], r["d_wg_hi"], bool(r["d_wg_sig"]))
            line[c] = delta(r["d_wg_mean"]) + ("" if interval == "—" else f" {interval}")
        out.append(line)
    return pd.DataFrame(out)


def _nan(x: Any) -> bool:
    return math.isnan(_num(x))


def table_notes(part: pd.DataFrame) -> list[str]:
    from subgroup_robustness.report.tables import DEGENERATE_MARK, RESELECTED_MARK

    words = metric_words(part)
    multilabel = (part["metric"] == "macro_f1_wg").any()
    notes = [f"{words.capitalize()} within each language (its own groups only: results.json "
             f"`{part['test_set'].iloc[0]}/lang_<code>/{part['metric'].iloc[0]}`), in %, mean ± std over seeds (sample "
             "std); n: the language's test examples in its groups. Δ: change against the base row of the same seed "
             "and configuration, in percentage points (mean over seeds)"
             + ("; intervals not computed for multi-label." if multilabel else
                "; [lo, hi]: 95% paired bootstrap interval over the language's test examples (resampled within its "
                "groups) and seeds, * where it excludes zero; no interval where a run's predictions or its base's "
                "are not here.")]
    _, absent = _languages_present(part)
    if absent:
        notes.append(f"Languages without test examples in these runs (left out): {', '.join(absent)}.")
    for setting, rows in part[part["degenerate"].astype(bool)].groupby("setting", sort=False):
        notes.append(f"{DEGENERATE_MARK} {setting} is degenerate (a broken model, never ranked).")
    if part["reselected"].astype(bool).any():
        notes.append(f"{RESELECTED_MARK} epoch re-picked (--selection): the per-language numbers of the run's own test "
                     "set are that epoch's (from the history), without interval; extra test sets are scored once, with "
                     "the epoch the run used.")
    flagged = part[part["note"].astype(str).str.len() > 0]
    for _, r in flagged.drop_duplicates(["setting", "note"]).iterrows():
        notes.append(f"{r['setting']} ({r['language']}): {r['note']}.")
    return notes


def write_tables(langs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``tables/<experiment>/<dataset>_languages[_<name>].md`` / ``.html`` per table and test set."""
    from subgroup_robustness.report.tables import to_html, to_markdown

    written: list[Path] = []
    if not len(langs):
        return written
    for (exp, ds, test_set), part in langs.groupby(["experiment", "dataset", "test_set"], sort=True):
        part = part.sort_values(["row_order"], kind="stable")
        folder = out_dir / "tables" / str(exp)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{file_stem(ds, test_set)}_languages"
        words = metric_words(part)
        title = f"{exp}: {ds} — {words} per language ({test_set})"
        wga, dlt = wga_table(part), delta_table(part)
        notes = table_notes(part)
        md = f"## {title}\n\n### {words.capitalize()} per language\n\n{to_markdown(wga)}\n"
        if len(dlt):
            md += f"### Δ {words} per language vs base\n\n{to_markdown(dlt)}\n"
        md += "\n\n".join(notes) + "\n"
        (folder / f"{stem}.md").write_text(md, encoding="utf-8")
        page = to_html(wga, title, "\n".join(notes))
        if len(dlt):
            page = page.replace("<p>", f"<h3>Δ {words} per language vs base</h3>"
                                + dlt.to_html(index=False, escape=True, border=0) + "<p>", 1)
        (folder / f"{stem}.html").write_text(page, encoding="utf-8")
        written += [folder / f"{stem}.md", folder / f"{stem}.html"]
    return written


def headlines(langs: pd.DataFrame) -> list[str]:
    """Per table and test set, the largest per-language drop among the compressed, non-degenerate rows (the
    controls are not compressions), with its interval."""
    from subgroup_robustness.report.tables import ci, delta

    lines: list[str] = []
    if not len(langs):
        return lines
    for (exp, ds, test_set), part in langs.groupby(["experiment", "dataset", "test_set"], sort=True):
        cand = part[part["base"].astype(bool) & ~part["degenerate"].astype(bool) & (part["family"] != "control")
                    & part["d_wg_mean"].notna()]
        if not len(cand):
            continue
        lo = cand.sort_values("d_wg_mean").iloc[0]
        sig_rows = cand[cand["d_wg_sig"].astype(bool) & (cand["d_wg_mean"] < 0)]
        line = f"- {exp} / {ds} ({test_set}): "
        if lo["d_wg_mean"] < 0:
            line += (f"largest per-language worst-group drop: {lo['setting']} in {lo['language']} "
                     f"{delta(lo['d_wg_mean'])} {ci(lo['d_wg_lo'], lo['d_wg_hi'], bool(lo['d_wg_sig']))}".rstrip(" —"))
        else:
            line += "no per-language worst-group drop"
        if len(sig_rows):
            by_lang = sig_rows.groupby("language", sort=False)["setting"].apply(list)
            line += "; drops whose interval excludes zero: " + "; ".join(
                f"{c}: {', '.join(map(str, s))}" for c, s in by_lang.items())
        lines.append(line)
    return lines
