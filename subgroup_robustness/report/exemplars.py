"""Who pays: the test examples whose prediction flips against the base in most seeds (Hooker et al.'s
compression-identified exemplars), with their group and text, and the groups ranked by flip rate.

From the predictions alone (``predictions.npz`` of a row's runs and of the base run of the same seed and
configuration, matched by example id):

- ``exemplars/<experiment>/<dataset>/<setting>.csv``: one line per test example whose predicted class
  differs from the base's in more than half of the seeds compared (every flipped example with one seed),
  most-flipped first: ``index`` (the row id of the dataset table), ``group``, ``label``, ``flips``,
  ``seeds``, ``correct_to_wrong``, ``wrong_to_correct`` (seeds in which the base was right and the run
  wrong, and the reverse), ``text`` (``text [SEP] text_pair`` for pairs);
- ``exemplars/<experiment>/<dataset>/groups_by_flip_rate.csv``: per setting, every group ranked by flip
  rate (flipped examples / examples over the seeds compared), with its correct→wrong and wrong→correct
  shares and its mean KL from results.json (``test/kl/<group>``) when recorded;
- ``tables/<experiment>/<dataset>_flips.md`` / ``.html``: per setting the flip rate and its most-flipped
  groups; and the groups ranked by mean flip rate over the non-degenerate settings (degenerate settings are
  shown, marked, and left out of the ranking).

The text comes from the dataset table the run was tested on, re-created from its own config
(``config.dataset``: ``GroupDataModule(dataset).load_table()``, whose subsample uses ``dataset.subsample``
and ``subsample_seed`` of that config; ``index`` is the row id of that table). Only local data is read:
the report never downloads. When the table cannot be loaded, or it does not match the run's test
examples (labels or attributes differ), the CSV is written without text and the report says why.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from subgroup_robustness.report.collect import Collection
from subgroup_robustness.utils.io import stable_hash

COLUMNS = ["index", "group", "label", "flips", "seeds", "correct_to_wrong", "wrong_to_correct", "text"]
TOP_GROUPS = 3


def safe_name(name: str) -> str:
    """A setting's name as a file name (``pr40 [group_dro] {x=1}`` -> ``pr40_group_dro_x=1``)."""
    safe = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+=,-]", "_", str(name))).strip("_") or "setting"
    return safe if len(safe) <= 100 else f"{safe[:80]}-{stable_hash(str(name), 8)}"


# ---- the dataset's texts, from local data only ---------------------------------------------------------
@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """While the report loads a dataset table: every network path of the data sources fails at once, as if
    offline (the sources then say the data is not available locally)."""
    import importlib
    import pkgutil

    from subgroup_robustness.data import sources
    from subgroup_robustness.data.sources import fetch
    from subgroup_robustness.utils.errors import DataUnavailableError

    def refuse(*_args: Any, **_kwargs: Any):
        raise DataUnavailableError("not available locally (the report reads local data only, it never downloads)")

    def refuse_stream(*_args: Any, **_kwargs: Any):
        raise fetch._Unreachable("the report reads local data only")

    patched: list[tuple[Any, str, Any]] = [(fetch, "_stream", fetch._stream)]
    fetch._stream = refuse_stream
    modules = [fetch] + [importlib.import_module(f"{sources.__name__}.{m.name}")
                         for m in pkgutil.iter_modules(sources.__path__)]
    for mod in modules:
        for name in ("pip_download", "read_hub"):
            if hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, refuse)
    try:
        yield
    finally:
        for mod, name, original in reversed(patched):
            setattr(mod, name, original)


class Texts:
    """Dataset tables by dataset config (loaded once each), or why not."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tables: dict[str, pd.DataFrame | str] = {}

    def table(self, dataset_cfg: Any) -> pd.DataFrame | str:
        if not self.enabled:
            return "texts not requested (--no-text)"
        if not isinstance(dataset_cfg, dict):
            return "the run recorded no dataset config"
        key = stable_hash(dataset_cfg, 16)
        if key not in self.tables:
            try:
                from subgroup_robustness.data.datamodule import GroupDataModule

                with no_downloads():
                    self.tables[key] = GroupDataModule(dataset=dataset_cfg).load_table()
            except Exception as exc:  # noqa: BLE001 - no data here: the CSV goes out without text
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.tables[key] = f"the dataset could not be loaded here ({first})"
        return self.tables[key]


def attach_text(frame: pd.DataFrame, table: pd.DataFrame | str, columns: list[str],
                metadata: tuple[np.ndarray, np.ndarray] | None) -> str | None:
    """Fill ``frame["text"]`` from the dataset table; None, or why not (the table is not the one tested)."""
    if isinstance(table, str):
        return table
    idx = frame["index"].to_numpy(dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(table)):
        return f"the dataset loaded here has {len(table)} rows, the run tested row ids up to {int(idx.max())}"
    rows = table.iloc[idx] if len(idx) else table.iloc[:0]
    if "label" in rows and len(rows) and not np.array_equal(rows["label"].to_numpy(dtype=np.int64),
                                                            frame["label_id"].to_numpy(dtype=np.int64)):
        return "the dataset loaded here does not match the run's test examples (labels differ): not its data"
    if metadata is not None and columns and all(c in rows for c in columns) and len(idx):
        ids, values = metadata  # the run's saved metadata, rows sorted by example id
        at = np.clip(np.searchsorted(ids, idx), 0, len(ids) - 1)
        meta = values[at]
        if (ids[at] == idx).all() and meta.shape[1] == len(columns) and \
                not np.array_equal(rows[columns].to_numpy(dtype=np.int64), meta):
            return "the dataset loaded here does not match the run's test examples (attributes differ): not its data"
    text = rows["text"].astype(str).to_numpy() if "text" in rows else np.array([""] * len(rows))
    if "text_pair" in rows:
        text = np.char.add(np.char.add(text.astype(str), " [SEP] "), rows["text_pair"].astype(str).to_numpy())
    frame["text"] = list(text)
    return None


# ---- flips per example, across seeds -------------------------------------------------------------------
def _group_labels(masks: np.ndarray, names: list[str]) -> list[str]:
    """Each example's groups as one string ("a; b" for overlapping groups), built once per membership pattern."""
    from subgroup_robustness.report.significance import unique_rows

    patterns, inverse = unique_rows(masks)
    text = np.array(["; ".join(n for n, m in zip(names, p) if m) for p in patterns], dtype=object)
    return list(text[inverse.reshape(-1)])


def flips_frame(col: Collection, pairs: list[tuple[Any, str, str]]
                ) -> tuple[pd.DataFrame, list[str], int, tuple[np.ndarray, np.ndarray] | None]:
    """(per example and seed: index, seed, flip, c2w, w2c, label_id, group names; the group names; seeds
    compared; (example ids, their saved metadata) of one run) for a row's (seed, run dir, base dir) pairs."""
    frames, names, meta = [], [], None
    for seed, run_dir, base_dir in pairs:
        a, b = col.predictions(run_dir), col.predictions(base_dir)
        if a is None or b is None or a.pred is None or b.pred is None:
            continue
        common, ia, ib = np.intersect1d(a.index, b.index, return_indices=True)
        if len(common) != len(a.index) or len(common) != len(b.index):
            col.problem(f"{run_dir}: tested on other examples than its base {base_dir}; no flips for seed {seed}")
            continue
        masks = a.masks[ia] if a.masks is not None else (b.masks[ib] if b.masks is not None else None)
        names = names or (a.group_names if a.masks is not None else b.group_names)
        groups = _group_labels(masks, names) if masks is not None else [""] * len(common)
        frames.append(pd.DataFrame({
            "index": common.astype(np.int64), "seed": seed, "flip": a.pred[ia] != b.pred[ib],
            "c2w": b.correct[ib] & ~a.correct[ia], "w2c": ~b.correct[ib] & a.correct[ia],
            "label_id": a.label[ia] if a.label is not None else -1, "group": groups}))
        if masks is not None:
            for j, g in enumerate(names):
                frames[-1][f"in:{g}"] = masks[:, j]
        if meta is None and a.metadata is not None:
            meta = (common.astype(np.int64), a.metadata[ia])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["index", "seed", "flip", "c2w", "w2c", "label_id", "group"])
    return df, names, len(frames), meta


def exemplars(df: pd.DataFrame, label_names: list[str]) -> pd.DataFrame:
    """Examples flipped in more than half of the seeds they were compared in, most-flipped first."""
    if not len(df):
        return pd.DataFrame(columns=[c for c in COLUMNS] + ["label_id"])
    agg = df.groupby("index", sort=True).agg(flips=("flip", "sum"), seeds=("seed", "nunique"),
                                             correct_to_wrong=("c2w", "sum"), wrong_to_correct=("w2c", "sum"),
                                             label_id=("label_id", "first"), group=("group", "first")).reset_index()
    agg = agg[(agg["flips"] > 0) & (2 * agg["flips"] > agg["seeds"])]
    agg = agg.sort_values(["flips", "correct_to_wrong", "index"], ascending=[False, False, True], kind="stable")
    agg["label"] = [label_names[int(i)] if 0 <= int(i) < len(label_names) else str(i) for i in agg["label_id"]]
    agg["text"] = ""
    for c in ("flips", "seeds", "correct_to_wrong", "wrong_to_correct"):
        agg[c] = agg[c].astype(int)
    return agg.reset_index(drop=True)


def group_ranking(df: pd.DataFrame, names: list[str], kl: dict[str, float]) -> pd.DataFrame:
    """Every group's flip rate (pooled over the seeds compared), its correct→wrong / wrong→correct shares and
    mean KL (results.json), ranked by flip rate; empty groups are listed last with n = 0."""
    rows = []
    for g in names:
        col = f"in:{g}"
        part = df[df[col].astype(bool)] if col in df else df.iloc[0:0]
        n = len(part)
        rows.append({"group": g, "n": n, "flip": part["flip"].mean() if n else math.nan,
                     "flip_c2w": part["c2w"].mean() if n else math.nan,
                     "flip_w2c": part["w2c"].mean() if n else math.nan, "kl": kl.get(g, math.nan)})
    out = pd.DataFrame(rows, columns=["group", "n", "flip", "flip_c2w", "flip_w2c", "kl"])
    out = out.sort_values(["flip", "group"], ascending=[False, True], na_position="last", kind="stable")
    out.insert(0, "rank", range(1, len(out) + 1))
    return out.reset_index(drop=True)


def _kl_by_group(col: Collection, run_dirs: list[str]) -> dict[str, float]:
    vals: dict[str, list[float]] = {}
    for d in run_dirs:
        test = ((col.records.get(d) or {}).get("metrics") or {}).get("test") or {}
        for k, v in test.items() if isinstance(test, dict) else []:
            if k.startswith("test/kl/") and isinstance(v, (int, float)):
                vals.setdefault(k[len("test/kl/"):], []).append(float(v))
    return {g: float(np.mean(v)) for g, v in vals.items()}


def write_exemplars(col: Collection, summary: pd.DataFrame, out: Path, texts: bool = True) -> dict[str, Any]:
    """Writes the exemplar CSVs, the group rankings and the flips tables. Returns {"files", "tables", "notes"}."""
    from subgroup_robustness.report.tables import DEGENERATE_MARK, pct, to_html, to_markdown

    loader = Texts(texts)
    files: list[Path] = []
    tables: list[Path] = []
    notes: dict[tuple[str, str, str], list[str]] = {}  # (experiment, dataset, why) -> settings
    for (exp, ds), part in summary.groupby(["experiment", "dataset"], sort=True):
        folder = out / "exemplars" / str(exp) / str(ds)
        ranking_rows, table_rows = [], []
        if "task" in part and (part["task"] == "multilabel").any():
            notes.setdefault((str(exp), str(ds), "multi-label: flips and exemplars are not computed (a prediction is "
                              "a label set)"), []).extend(map(str, part.loc[part["base"].astype(bool), "setting"]))
            continue
        for _, row in part.iterrows():
            pairs = col.pairs.get((exp, ds, row["setting"]), {}).get("base") or []
            if not row["base"] or not pairs:
                continue
            df, names, seeds, meta = flips_frame(col, pairs)
            if not seeds:
                continue
            run_dirs = [d for _, d, _ in pairs]
            rec = col.records.get(run_dirs[0]) or {}
            dataset_cfg = (rec.get("config") or {}).get("dataset") if isinstance(rec.get("config"), dict) else None
            label_names = list((dataset_cfg or {}).get("label_names") or []) if isinstance(dataset_cfg, dict) else []
            ex = exemplars(df, label_names)
            why = None
            if len(ex):
                from subgroup_robustness.data.groups import metadata_columns

                try:
                    columns = list(metadata_columns(dataset_cfg)) if isinstance(dataset_cfg, dict) else []
                except Exception:  # noqa: BLE001
                    columns = []
                why = attach_text(ex, loader.table(dataset_cfg), columns, meta)
            if why:
                notes.setdefault((str(exp), str(ds), why), []).append(str(row["setting"]))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{safe_name(row['setting'])}.csv"
            ex[COLUMNS].to_csv(path, index=False)
            files.append(path)
            ranking = group_ranking(df, names, _kl_by_group(col, run_dirs))
            ranking.insert(0, "setting", row["setting"])
            ranking.insert(1, "degenerate", bool(row["degenerate"]))
            ranking.insert(2, "seeds", seeds)
            ranking_rows.append(ranking)
            top = ranking[(ranking["n"] > 0) & (ranking["flip"] > 0)].head(TOP_GROUPS)
            mark = f" {DEGENERATE_MARK}" if row["degenerate"] else ""
            table_rows.append({
                "Setting": f"{row['setting']}{mark}", "Seeds": str(seeds),
                "Flip %": pct(df["flip"].mean() if len(df) else math.nan),
                "Correct→wrong %": pct(df["c2w"].mean() if len(df) else math.nan),
                "Wrong→correct %": pct(df["w2c"].mean() if len(df) else math.nan),
                "Exemplars": str(len(ex)),
                "Most-flipped groups (flip %)": "; ".join(f"{r['group']} {100 * r['flip']:.1f}" for _, r in top.iterrows())
                or "—"})
        if not ranking_rows:
            continue
        long = pd.concat(ranking_rows, ignore_index=True)
        folder.mkdir(parents=True, exist_ok=True)
        long.to_csv(folder / "groups_by_flip_rate.csv", index=False)
        files.append(folder / "groups_by_flip_rate.csv")
        tables += _flip_tables(long, table_rows, out / "tables" / str(exp), str(exp), str(ds), to_markdown, to_html)
    lines = [f"{exp} / {ds}: no exemplars — {why}." if why.startswith("multi-label") else
             f"{exp} / {ds}: exemplars of {', '.join(settings)} written without text — {why}."
             for (exp, ds, why), settings in notes.items()]
    return {"files": files, "tables": tables, "notes": lines}


def _flip_tables(long: pd.DataFrame, table_rows: list[dict], folder: Path, exp: str, ds: str, to_markdown, to_html
                 ) -> list[Path]:
    from subgroup_robustness.report.tables import DEGENERATE_MARK, pct

    ranked = long[~long["degenerate"].astype(bool)]
    settings = list(dict.fromkeys(long["setting"]))
    groups = list(dict.fromkeys(long["group"]))
    mean = ranked.groupby("group")["flip"].mean() if len(ranked) else pd.Series(dtype=float)
    n = long.groupby("group")["n"].max()
    order = sorted(groups, key=lambda g: (-(mean.get(g, math.nan) if not math.isnan(mean.get(g, math.nan)) else -1), g))
    matrix = []
    for i, g in enumerate(order, 1):
        m = mean.get(g, math.nan)
        line = {"Rank": str(i) if not math.isnan(m) else "—", "Group": g, "n (all seeds)": str(int(n.get(g, 0))),
                "Mean flip % (non-degenerate)": pct(m)}
        for s in settings:
            part = long[(long["setting"] == s) & (long["group"] == g)]
            degenerate = bool(part["degenerate"].any()) if len(part) else False
            line[f"{s} {DEGENERATE_MARK}" if degenerate else s] = pct(part["flip"].iloc[0]) if len(part) else "—"
        matrix.append(line)
    folder.mkdir(parents=True, exist_ok=True)
    by_setting, by_group = pd.DataFrame(table_rows), pd.DataFrame(matrix)
    title = f"{exp}: {ds} — prediction flips against the base"
    note = (f"Flip %: test predictions whose class differs from the base's (same seed and configuration), over "
            f"the seeds compared; correct→wrong + wrong→correct = flip % with two classes. Exemplars: examples "
            f"flipped in more than half of the seeds (exemplars/{exp}/{ds}/<setting>.csv, with group and text). "
            f"Groups are ranked by their mean flip rate over the non-degenerate settings; {DEGENERATE_MARK} degenerate "
            f"settings are shown but never ranked. Flips come from the predictions saved with each run (the epoch it "
            f"used).")
    md = (f"## {title}\n\n### By setting\n\n{to_markdown(by_setting)}\n### Groups ranked by flip rate\n\n"
          f"{to_markdown(by_group)}\n{note}\n")
    (folder / f"{ds}_flips.md").write_text(md, encoding="utf-8")
    (folder / f"{ds}_flips.html").write_text(
        to_html(by_setting, title, note).replace("</body>", "<h3>Groups ranked by flip rate</h3>"
                                                 + by_group.to_html(index=False, escape=True, border=0) + "</body>"),
        encoding="utf-8")
    return [folder / f"{ds}_flips.md", folder / f"{ds}_flips.html"]
