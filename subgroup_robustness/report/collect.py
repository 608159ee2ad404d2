"""Every results.json under some folders, as one table: finished, failed and still-running jobs alike, so
a report can be drawn in the middle of a sweep.

A *setting* is one row of the paper's tables: the compressor's name, or, for a model fine-tuned without
compression that is not the reference, the model's name (the distilled checkpoints). The *reference*
model of an experiment and dataset is the one the compressors were applied to (or, with none applied,
the largest model fine-tuned as is); its uncompressed runs are the ``base`` row every other row is
compared with, seed by seed.

Row order comes from the data, so a new compressor needs no code here (``row_order``): the ``base`` row
first, then one block per family (alphabetically), each in the order of the experiment's sweep list (the
grid's ``setting`` / ``compressor`` / ``model`` lists, read from results.json's ``sweep`` or the job's
``.hydra/hydra.yaml``), then by name stem, size (largest first) and name. For the paper's grid that is
Table 1's order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from subgroup_robustness.data.groups import PRIMARY
from subgroup_robustness.results import RESULTS_FILE
from subgroup_robustness.utils.errors import UserError
from subgroup_robustness.utils.io import read_json

BASE = "base"
# the family of a distilled checkpoint fine-tuned as is (the paper's KD rows)
CHECKPOINT_FAMILY = "distillation"
KEY = ["experiment", "dataset", "setting", "seed"]
# the sweeper lists a grid's rows come from, in this order of precedence (conf/experiment/*.yaml)
SWEEP_KEYS = ("setting", "compressor", "model")


class NoResultsError(UserError):
    """No results.json under the folders given to the report."""


@dataclass
class Collection:
    runs: pd.DataFrame                      # one row per results.json, every status; `used` marks the rows
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # run dir -> results.json

    @property
    def completed(self) -> pd.DataFrame:
        return self.runs[(self.runs["status"] == "completed") & self.runs["used"]]

    def groups(self) -> pd.DataFrame:
        """Long table of per-group test accuracy: experiment, dataset, setting, seed, group, acc, count."""
        rows = []
        for _, r in self.completed.iterrows():
            res = ((self.records[r["dir"]].get("groups") or {}).get("test") or {}).get(PRIMARY) or {}
            for g, acc in (res.get("acc") or {}).items():
                rows.append({**{k: r[k] for k in KEY}, "family": r["family"], "row_order": r["row_order"],
                             "group": g, "acc": math.nan if acc is None else float(acc),
                             "count": (res.get("count") or {}).get(g)})
        return pd.DataFrame(rows, columns=[*KEY, "family", "row_order", "group", "acc", "count"])


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise NoResultsError(f"{p} does not exist; give the report a sweep folder, a results folder "
                                 f"(e.g. logs) or a results.json")
        if p.is_file():
            found.append(p)
        else:
            found.extend(sorted(q for q in p.rglob(RESULTS_FILE) if ".submitit" not in q.parts))
    return sorted(set(found))


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _num(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def run_row(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    run = rec.get("run") or {}
    test, val = _get(rec, "metrics", "test", default={}), _get(rec, "metrics", "val", default={})
    base_test = _get(rec, "base", "metrics", "test", default={})
    err = rec.get("error") or {}
    return {
        "dir": str(path.parent),
        "status": rec.get("status", "unknown"),
        "experiment": run.get("experiment", "default"),
        "dataset": run.get("dataset"),
        "model": run.get("model"),
        "compressor": run.get("compressor", "none"),
        "family": run.get("family", "none"),
        "objective": run.get("objective", "erm"),
        "seed": run.get("seed"),
        "size_mb": _num(_get(rec, "model", "size_mb")),
        "params": _num(_get(rec, "model", "params")),
        "acc_avg": _num(test.get("test/acc_avg")),
        "acc_wg": _num(test.get("test/acc_wg")),
        "val_acc_avg": _num(val.get("val/acc_avg")),
        "val_acc_wg": _num(val.get("val/acc_wg")),
        "worst_group": _get(rec, "groups", "test", PRIMARY, "worst_group"),
        "base_acc_avg": _num(base_test.get("test/acc_avg")),
        "base_acc_wg": _num(base_test.get("test/acc_wg")),
        "seconds": _num(_get(rec, "timing", "total")),
        "started": rec.get("started"),
        "finished": rec.get("finished"),
        "error": f"{err.get('type', '')}: {err.get('message', '')}" if err else None,
        "predictions": str(path.parent / rec["predictions"]) if rec.get("predictions") else None,
        "run_id": rec.get("run_id"),
    }


def reference_models(runs: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(experiment, dataset) -> the model the compressors were applied to (else the largest as-is model)."""
    out = {}
    for (exp, ds), part in runs.groupby(["experiment", "dataset"], dropna=False):
        compressed = part[part["compressor"] != "none"]
        if len(compressed):
            counts = Counter(compressed["model"])
            top = max(counts.values())
            out[(exp, ds)] = sorted(m for m, c in counts.items() if c == top)[0]  # ties: deterministic
        elif len(part):
            out[(exp, ds)] = part.sort_values("params", ascending=False, na_position="last")["model"].iloc[0]
    return out


def label(row: pd.Series, reference: str | None) -> tuple[str, str]:
    """(setting, family) of a run."""
    if not isinstance(row["compressor"], str) or not isinstance(row["model"], str):
        return "?", "?"  # an unreadable results.json
    if row["compressor"] == "none":
        setting, family = (BASE, "none") if row["model"] == reference else (row["model"], CHECKPOINT_FAMILY)
    else:
        setting, family = row["compressor"], row["family"]
        if reference is not None and row["model"] != reference:
            setting = f"{row['model']}+{setting}"
    if row["objective"] not in (None, "erm"):
        setting = f"{setting} [{row['objective']}]"
    return setting, family


def base_label(row: pd.Series, reference: str | None) -> str:
    """The row a run is compared with: its own model without compression (a compressed run), or the
    reference model without compression (a checkpoint fine-tuned as is); same objective."""
    if not isinstance(row["compressor"], str):
        return "?"
    model = row["model"] if row["compressor"] != "none" else reference
    return label(pd.Series({**row.to_dict(), "model": model, "compressor": "none"}), reference)[0]


# ---- row order ---------------------------------------------------------------------------------------
def _sweep_names(params: Any) -> list[str]:
    """Row names from a sweeper's params ({setting: "base,pr20,...", ...}); non-list sweeps are skipped."""
    if not isinstance(params, dict):
        return []
    names: list[str] = []
    for key in SWEEP_KEYS:
        value = params.get(key)
        items = value if isinstance(value, list) else str(value or "").split(",")
        names += [str(v).strip() for v in items if str(v).strip() and not re.search(r"[()\[\]{}=:]", str(v))]
    return names


def sweep_rows(run_dir: Path, rec: dict[str, Any]) -> list[str]:
    """The rows of the grid a run was launched from, in the experiment's order: results.json's
    ``sweep.params`` when recorded, else the sweeper params in Hydra's ``<run dir>/.hydra/hydra.yaml``."""
    recorded = _get(rec, "sweep", "params")
    if recorded:
        return _sweep_names(recorded)
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        hydra = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    return _sweep_names(_get(hydra, "hydra", "sweeper", "params", default={}))


def _natural(name: str) -> tuple:
    """pr20 < pr100: digits compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def row_order(runs: pd.DataFrame, sweeps: dict[str, list[str]]) -> pd.Series:
    """Each run's row position within its experiment (0 = first row). Per objective (ERM first): the
    ``base`` row, then families alphabetically; within a family the experiment's sweep list (``sweeps``:
    experiment -> row names), then the name's stem (``pr`` of ``pr40``), size (largest first) and name."""
    exps = runs["experiment"].map(lambda e: e if isinstance(e, str) else "")  # unreadable runs have none
    settings = runs["setting"].map(str)
    keys: dict[tuple[str, str], tuple] = {}
    for (exp, setting), part in runs.groupby([exps, settings], sort=False):
        name, _, objective = setting.partition(" [")
        family = str(part["family"].iloc[0])
        listed = sweeps.get(exp, [])
        size = pd.to_numeric(part["size_mb"], errors="coerce").mean()
        keys[(exp, setting)] = (name == "?", objective, family != "none", family,
                                listed.index(name) if name in listed else len(listed),
                                re.sub(r"\d+$", "", name), 0.0 if math.isnan(size) else -round(size, 3),
                                _natural(name))
    rank: dict[tuple[str, str], int] = {}
    for exp in dict.fromkeys(e for e, _ in keys):
        ordered = sorted((k for k in keys if k[0] == exp), key=keys.__getitem__)
        rank.update({k: i for i, k in enumerate(ordered)})
    return pd.Series([rank[k] for k in zip(exps, settings)], index=runs.index, dtype=int)


def collect(paths: Iterable[str | Path] | str | Path) -> Collection:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = find_results(paths)
    rows, records = [], {}
    sweeps: dict[Any, list[str]] = {}
    for f in files:
        try:
            rec = read_json(f)
        except (OSError, ValueError) as exc:  # a half-copied file must not sink the report
            rows.append({"dir": str(f.parent), "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(run_row(f, rec))
        records[str(f.parent)] = rec
        listed = sweeps.setdefault(rows[-1]["experiment"], [])
        listed += [n for n in sweep_rows(f.parent, rec) if n not in listed]
    if not rows:
        raise NoResultsError(f"no {RESULTS_FILE} under {', '.join(map(str, paths))}; run a sweep first "
                             f"(make grid) or point the report at the folder it wrote (logs/<experiment>/multirun)")
    runs = pd.DataFrame(rows)
    for col in run_row(Path("x") / RESULTS_FILE, {}).keys():
        if col not in runs:
            runs[col] = None
    refs = reference_models(runs[runs["status"] == "completed"])
    labels = [label(r, refs.get((r["experiment"], r["dataset"]))) for _, r in runs.iterrows()]
    runs["setting"] = [s for s, _ in labels]
    runs["family"] = [f for _, f in labels]
    runs["base_setting"] = [base_label(r, refs.get((r["experiment"], r["dataset"]))) for _, r in runs.iterrows()]
    runs["reference_model"] = [refs.get((r["experiment"], r["dataset"])) for _, r in runs.iterrows()]
    runs["used"] = _latest_completed(runs)
    runs["row_order"] = row_order(runs, sweeps)
    order = ["status", "used", *KEY, "family", "row_order", "base_setting", "model", "compressor", "objective",
             "size_mb", "params", "acc_avg", "acc_wg", "val_acc_avg", "val_acc_wg", "worst_group", "base_acc_avg",
             "base_acc_wg", "seconds", "started", "finished", "error", "reference_model", "run_id", "predictions", "dir"]
    runs = runs[order + [c for c in runs.columns if c not in order]]
    return Collection(runs=runs.sort_values([*KEY, "dir"], na_position="last").reset_index(drop=True),
                      records=records)


def _latest_completed(runs: pd.DataFrame) -> pd.Series:
    """One completed run per experiment/dataset/setting/seed: the last finished (reruns supersede)."""
    used = pd.Series(False, index=runs.index)
    done = runs[runs["status"] == "completed"]
    for _, part in done.groupby(KEY, dropna=False):
        used[part.sort_values("finished", na_position="first").index[-1]] = True
    return used


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in runs["status"].value_counts().items()}
