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

Runs are pooled as the seeds of one row only when their run identity (the resolved config minus paths and
logging, ``experiment.identity_payload``) agrees once the seed is set aside. Runs of one table whose
configs differ beyond the setting (compressor, model, objective) and the seed are never pooled and never
compared with each other: every row of such a table carries the differing keys, e.g.
``pr40 {trainer.max_epochs=1}``, and is compared with the base and the control of the same configuration.

Calibration data is part of a row, not a configuration difference: a run whose compressor calibrates on
training examples (``config.compressor.calibration.source``: natural | group_balanced | worst_group) is the
row ``<setting>@<source>`` (``wanda50@worst_group``; ``natural``, the default draw, stays ``wanda50``), so the
three sources of one method are three rows of one table, each pooled over its seeds and compared with the same
base; ``report.calibration`` sets them side by side.

Multi-label runs (``config.dataset.task: multilabel``, ECtHR) have no accuracy: ``task`` says so, and their
rows carry macro-/micro-F1 (average, worst group) and FairLex's group disparity instead.

A results.json that cannot be read (garbage, ``null``, truncated, a completed record without its run
fields) becomes one ``unreadable`` row and one line in ``Collection.problems``; the rest of the report is
written.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from subgroup_robustness.data.groups import PRIMARY
from subgroup_robustness.report import selection as sel
from subgroup_robustness.results import RESULTS_FILE, read_record
from subgroup_robustness.utils.errors import UserError
from subgroup_robustness.utils.io import flatten, stable_hash

BASE = "base"
# the family of a distilled checkpoint fine-tuned as is (the paper's KD rows)
CHECKPOINT_FAMILY = "distillation"
KEY = ["experiment", "dataset", "setting", "seed"]
# the sweeper lists a grid's rows come from, in this order of precedence (conf/experiment/*.yaml)
SWEEP_KEYS = ("setting", "compressor", "model")
# config keys that never separate two runs' rows (as for the job folders: they do not change a result), and
# any key named cache_dir (where a machine keeps its caches; the same run on a colleague's machine pools)
POOL_IGNORED = ("tags", "data.num_workers", "trainer.devices", "trainer.accelerator")
POOL_IGNORED_NAMES = ("cache_dir",)
# config sections a row's label already names: a setting's base and control differ from it only there
ROW_SECTIONS = ("compressor", "model", "objective")
# how many differing keys a row label shows (all of them are in runs.csv / summary.csv `variant`)
VARIANT_SHOWN = 3
# the calibration draw a row name carries (``<setting>@<source>``); the default draw is left unsuffixed
CALIBRATION_KEY = "compressor.calibration.source"
CALIBRATION_DEFAULT = "natural"
CALIBRATION_SOURCES = ("natural", "group_balanced", "worst_group")
SINGLE_LABEL, MULTILABEL = "single_label", "multilabel"
# what a multi-label run reports in place of accuracy (results.json: test/<name>)
MULTILABEL_METRICS = ("macro_f1_avg", "macro_f1_wg", "gd_macro_f1", "micro_f1_avg", "micro_f1_wg", "gd_micro_f1")


class NoResultsError(UserError):
    """No results.json under the folders given to the report."""


@dataclass
class Collection:
    runs: pd.DataFrame                      # one row per results.json, every status; `used` marks the rows
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # run dir -> results.json
    problems: list[str] = field(default_factory=list)  # one line per file skipped (or used only in part)
    selection: str | None = None            # the selection rule re-applied (None: each run's own)
    reselected: dict[str, sel.Reselection] = field(default_factory=dict)  # run dir -> its selection
    # (experiment, dataset, setting) -> {"base": [(seed, run dir, base dir)], "control": [...]} (summarize)
    pairs: dict[tuple, dict[str, list[tuple[Any, str, str]]]] = field(default_factory=dict)
    _predictions: dict[str, Any] = field(default_factory=dict, repr=False)
    _configs: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> pd.DataFrame:
        return self.runs[(self.runs["status"] == "completed") & self.runs["used"]]

    def problem(self, line: str) -> None:
        if line not in self.problems:
            self.problems.append(line)

    def predictions(self, run_dir: str):
        """The run's predictions.npz as ``significance.Predictions`` (cached), or None — a missing or corrupt
        file is named once in ``problems`` and costs the run only its intervals, flips and exemplars."""
        if run_dir in self._predictions:
            return self._predictions[run_dir]
        from subgroup_robustness.report.significance import load_predictions
        from subgroup_robustness.results import PREDICTIONS_FILE

        rec = self.records.get(run_dir) or {}
        name = rec.get("predictions") if isinstance(rec.get("predictions"), str) else PREDICTIONS_FILE
        path = Path(run_dir) / name
        out = None
        if not path.is_file():
            self.problem(f"{path}: missing; the run counts without intervals, flips or exemplars")
        else:
            dataset_cfg = (rec.get("config") or {}).get("dataset") if isinstance(rec.get("config"), dict) else None
            try:
                out = load_predictions(path, dataset_cfg)
            except Exception as exc:  # noqa: BLE001 - one bad file must not sink the report
                why = (str(exc).splitlines() or [""])[0].replace(f" in {path}", "").replace(str(path), "the file")
                self.problem(f"{path}: unreadable ({type(exc).__name__}: {why}); "
                             "the run counts without intervals, flips or exemplars")
        self._predictions[run_dir] = out
        return out

    def groups(self) -> pd.DataFrame:
        """Long table of per-group test accuracy: experiment, dataset, setting, seed, group, acc, count (the
        re-selected epoch's accuracies where ``selection`` changed a run's epoch)."""
        rows = []
        for _, r in self.completed.iterrows():
            res = _get(self.records[r["dir"]], "groups", "test", PRIMARY, default={})
            res = res if isinstance(res, dict) else {}
            metric = "macro_f1" if r.get("task") == MULTILABEL else "acc"
            accs = res.get(metric) if isinstance(res.get(metric), dict) else {}
            again = self.reselected.get(r["dir"])
            if again is not None and again.changed:
                accs = {g: again.test.get(f"test/{metric}/{g}", math.nan) for g in accs}
            for g, acc in accs.items():
                rows.append({**{k: r[k] for k in KEY}, "family": r["family"], "row_order": r["row_order"],
                             "degenerate": bool(r.get("degenerate", False)),
                             "group": g, "acc": _num(acc), "count": (res.get("count") or {}).get(g),
                             "metric": metric})
        return pd.DataFrame(rows, columns=[*KEY, "family", "row_order", "degenerate", "group", "acc", "count",
                                           "metric"])

    # ---- per test set (the run's own ``test`` and every extra test set ``test_<name>``) -----------------
    def dataset_config(self, run_dir: str, prefix: str = "test") -> dict[str, Any] | None:
        """The dataset config a run's test set ``prefix`` was scored with: ``config.dataset`` for ``test``; for an
        extra test set, the config recorded in ``eval_datasets[<name>]`` (``dataset_config``), else the one
        ``evaluation.eval_dataset_config`` re-composes from the run's ``eval_datasets`` entry (today's
        ``conf/dataset/<name>.yaml``: the per-language tables check that it reproduces the recorded groups)."""
        rec = self.records.get(run_dir) or {}
        if prefix == "test":
            cfg = _get(rec, "config", "dataset")
            return cfg if isinstance(cfg, dict) else None
        key = (run_dir, prefix)
        if key in self._configs:
            return self._configs[key]
        name, info = _extra_set(rec, prefix)
        cfg = None
        for k in ("dataset_config", "config"):
            if isinstance((info or {}).get(k), dict) and (info or {}).get(k):
                cfg = info[k]
                break
        if cfg is None and name is not None:
            try:
                from subgroup_robustness.evaluation import eval_dataset_config, eval_entries

                entry = next((e for e in eval_entries(rec.get("config") or {}) if e["name"] == name), None)
                if entry is not None:
                    cfg = eval_dataset_config(rec["config"], entry)
            except Exception as exc:  # noqa: BLE001 - the tables stand, the intervals need the config
                why = str(exc).splitlines()[0][:160] if str(exc) else ""
                self.problem(f"{Path(run_dir) / RESULTS_FILE}: the config of extra test set {name!r} is not recorded "
                             f"and could not be re-composed ({type(exc).__name__}: {why}); "
                             "no per-language intervals for it")
        self._configs[key] = cfg
        return cfg

    def predictions_of(self, run_dir: str, prefix: str = "test", dataset_cfg: Mapping | None = None):
        """The predictions of a run's test set ``prefix`` (``predictions.npz``, or ``predictions_<name>.npz`` of an
        extra test set) as ``significance.Predictions`` with their metadata, or None (named once in
        ``problems``). ``dataset_cfg``: the config the primary masks are built from (default: the run's)."""
        rec = self.records.get(run_dir) or {}
        if prefix == "test" and (dataset_cfg is None or dataset_cfg == _get(rec, "config", "dataset")):
            return self.predictions(run_dir)
        key = f"{run_dir}\0{prefix}"
        if key in self._predictions:
            return self._predictions[key]
        from subgroup_robustness.report.significance import load_predictions

        if prefix == "test":
            fname = rec.get("predictions") if isinstance(rec.get("predictions"), str) else None
            from subgroup_robustness.results import PREDICTIONS_FILE

            fname = fname or PREDICTIONS_FILE
        else:
            name, info = _extra_set(rec, prefix)
            fname = (info or {}).get("predictions") if isinstance((info or {}).get("predictions"), str) else \
                (f"predictions_{name}.npz" if name else None)
        out = None
        path = Path(run_dir) / fname if fname else None
        if path is None or not path.is_file():
            self.problem(f"{path or Path(run_dir) / ('predictions_' + prefix[5:] + '.npz')}: missing; "
                         f"no intervals for {prefix}")
        else:
            cfg = dataset_cfg if dataset_cfg is not None else self.dataset_config(run_dir, prefix)
            try:
                out = load_predictions(path, cfg)
            except Exception as exc:  # noqa: BLE001 - one bad file must not sink the report
                why = (str(exc).splitlines() or [""])[0].replace(f" in {path}", "").replace(str(path), "the file")
                self.problem(f"{path}: unreadable ({type(exc).__name__}: {why}); no intervals for {prefix}")
        self._predictions[key] = out
        return out

    def cached_base(self, run_dir: str) -> tuple[str, Any] | None:
        """(folder, predictions) of the cached fine-tuned base a compressed run started from
        (``base.cache_dir`` in its results.json, with its ``predictions.npz``), when that folder is on this
        machine: the base of a sweep that has no base run of its own (``experiment=calibration``)."""
        rec = self.records.get(run_dir) or {}
        cache = _get(rec, "base", "cache_dir")
        if not isinstance(cache, str) or not cache:
            return None
        from subgroup_robustness.results import PREDICTIONS_FILE

        path = Path(cache) / PREDICTIONS_FILE
        if cache not in self._predictions:
            if not path.is_file():
                self._predictions[cache] = None
            else:
                from subgroup_robustness.report.significance import load_predictions

                try:
                    self._predictions[cache] = load_predictions(path, _get(rec, "config", "dataset"))
                except Exception:  # noqa: BLE001 - a broken cache costs the row its interval only
                    self._predictions[cache] = None
        return (cache, self._predictions[cache]) if self._predictions[cache] is not None else None


def _extra_set(rec: dict[str, Any], prefix: str) -> tuple[str | None, dict[str, Any] | None]:
    """(name, ``eval_datasets[name]``) of the extra test set whose metric prefix is ``prefix``."""
    sets = rec.get("eval_datasets") if isinstance(rec.get("eval_datasets"), dict) else {}
    for name, info in sets.items():
        if isinstance(info, dict) and info.get("prefix", f"test_{name}") == prefix:
            return str(name), info
    return (prefix[len("test_"):], None) if prefix.startswith("test_") else (None, None)


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


def _code_label(code: Any) -> str:
    """package version @ git commit (+dirty): the code a run was computed with ("unknown" for old records)."""
    if not isinstance(code, dict) or not code:
        return "unknown"
    commit = code.get("git_commit")
    return (f"{code.get('version') or '?'}@{str(commit)[:8] if commit else 'no-git'}"
            + ("+dirty" if code.get("dirty") else ""))


def run_row(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    run = rec.get("run") if isinstance(rec.get("run"), dict) else {}
    test, val = _get(rec, "metrics", "test", default={}), _get(rec, "metrics", "val", default={})
    test, val = (test if isinstance(test, dict) else {}), (val if isinstance(val, dict) else {})
    probe = _get(rec, "metrics", "probe", default={})
    probe = probe if isinstance(probe, dict) else {}
    base_test = _get(rec, "base", "metrics", "test", default={})
    base_test = base_test if isinstance(base_test, dict) else {}
    err = rec.get("error") or {}
    err = err if isinstance(err, dict) else {"type": "error", "message": str(err)}
    degenerate = rec.get("degenerate") if isinstance(rec.get("degenerate"), dict) else {}
    reasons = degenerate.get("reasons") if isinstance(degenerate.get("reasons"), list) else []
    control = _get(rec, "config", "compressor", "control")
    calibration = _get(rec, "config", "compressor", "calibration")
    source = calibration.get("source") if isinstance(calibration, dict) else None
    task = _get(rec, "config", "dataset", "task", default=SINGLE_LABEL)
    own = sel.own_phase(rec)
    return {
        "dir": str(path.parent),
        "status": rec.get("status", "unknown") if isinstance(rec.get("status"), str) else "unknown",
        "experiment": run.get("experiment") or "default",
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
        "acc_worst_class": _num(test.get("test/acc_worst_class")),
        "acc_mean_group": _num(test.get("test/acc_mean_group")),
        "acc_balanced": _num(test.get("test/acc_balanced")),
        "ece": _num(test.get("test/ece")),
        "flip_rate": _num(test.get("test/flip_rate")),
        "flip_c2w": _num(test.get("test/flip_c2w")),
        "flip_w2c": _num(test.get("test/flip_w2c")),
        "kl": _num(test.get("test/kl")),
        "task": task if isinstance(task, str) else SINGLE_LABEL,
        **{m: _num(test.get(f"test/{m}")) for m in MULTILABEL_METRICS},
        **{f"base_{m}": _num(base_test.get(f"test/{m}")) for m in MULTILABEL_METRICS},
        "calibration": source if isinstance(source, str) and source else None,
        "probe_acc_avg": _num(probe.get("probe/acc_avg")),
        "probe_acc_wg": _num(probe.get("probe/acc_wg")),
        "degenerate": bool(degenerate.get("degenerate", False)),
        "degenerate_reasons": "; ".join(map(str, reasons)),
        "control": control if isinstance(control, str) and control else None,
        "monitor": (own or {}).get("monitor"),
        "history": bool(own and own.get("history")),
        "base_acc_avg": _num(base_test.get("test/acc_avg")),
        "base_acc_wg": _num(base_test.get("test/acc_wg")),
        "seconds": _num(_get(rec, "timing", "total")),
        "started": rec.get("started"),
        "finished": rec.get("finished"),
        "error": f"{err.get('type', '')}: {err.get('message', '')}" if err else None,
        "predictions": str(path.parent / rec["predictions"]) if isinstance(rec.get("predictions"), str) else None,
        "run_id": rec.get("run_id"),
        "code": _code_label(rec.get("code")),
    }


def _usable(row: dict[str, Any]) -> str | None:
    """Why a completed record cannot be a row of a table (None: it can)."""
    missing = [k for k in ("dataset", "model", "compressor") if not isinstance(row.get(k), str)]
    seed = row.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or (isinstance(seed, float) and not seed.is_integer()):
        missing.append("seed")
    return f"a completed record without run.{', run.'.join(missing)}" if missing else None


# ---- run identity: which runs may be pooled ------------------------------------------------------------
def identity(rec: dict[str, Any]) -> dict[str, str] | None:
    """The run's identity minus its seed, flattened (dotted key -> JSON value); None without a config.

    ``experiment.identity_payload`` (the resolved config minus paths, logging and measurement), without the
    keys that never separate two runs (``POOL_IGNORED``), ``data.dataset`` when it repeats ``dataset``, and
    the seed: ``seed`` itself, and every ``*.seed`` key holding the run's seed (``data.seed: ${seed}``)."""
    cfg = rec.get("config")
    if not isinstance(cfg, dict) or not cfg:
        return None
    try:  # the light home, if the payload moves next to the file formats
        from subgroup_robustness.results import identity_payload  # type: ignore[attr-defined]
    except ImportError:
        from subgroup_robustness.experiment import identity_payload

    payload = identity_payload(cfg)
    data = payload.get("data")
    if isinstance(data, dict) and "dataset" in data and data.get("dataset") == payload.get("dataset"):
        payload = {**payload, "data": {k: v for k, v in data.items() if k != "dataset"}}
    seed = _get(rec, "run", "seed", default=cfg.get("seed"))
    payload = _mask_seed(payload, seed)  # also inside lists: compressor.stages[*].calibration.seed
    out: dict[str, str] = {}
    for key, value in flatten(payload).items():
        if key == "seed" or any(key == p or key.startswith(p + ".") for p in POOL_IGNORED) \
                or key.rsplit(".", 1)[-1] in POOL_IGNORED_NAMES:
            continue
        if key.rsplit(".", 1)[-1] == "seed" and value == seed and not isinstance(value, bool):
            value = "<seed>"
        out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


def _mask_seed(obj: Any, seed: Any) -> Any:
    """Every ``seed`` key holding the run's seed, at any depth (lists included), becomes ``<seed>``."""
    if isinstance(obj, dict):
        return {k: ("<seed>" if k == "seed" and v == seed and not isinstance(v, bool) and seed is not None
                    else _mask_seed(v, seed)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_seed(v, seed) for v in obj]
    return obj


def _context(flat: dict[str, str] | None) -> dict[str, str] | None:
    """What a run shares with its base and its control: the identity without the sections a label names."""
    if flat is None:
        return None
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in ROW_SECTIONS)}


def _model_part(flat: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (flat or {}).items() if k == "model" or k.startswith("model.")}


def _differing(flats: list[dict[str, str]]) -> list[str]:
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({f.get(k, "<absent>") for f in flats}) > 1]


def _shown(value: str) -> str:
    try:
        v = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return v if isinstance(v, str) else json.dumps(v)


def _variant(flat: dict[str, str] | None, keys: list[str]) -> str:
    if flat is None:
        return "config not recorded"
    return ", ".join(f"{k}={_shown(flat[k]) if k in flat else '<absent>'}" for k in keys)


def _short(variant: str, keys: list[str], flat: dict[str, str] | None) -> str:
    if flat is None or len(keys) <= VARIANT_SHOWN:
        return variant
    return _variant(flat, keys[:VARIANT_SHOWN]) + f", +{len(keys) - VARIANT_SHOWN} more"


def _without_source(flat: dict[str, str]) -> dict[str, str]:
    """A flat identity without the calibration source: the top-level knob and its copy in every stage."""
    def mask(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("<source>" if k == "source" and "examples" in obj else mask(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mask(v) for v in obj]
        return obj

    out = {}
    for k, v in flat.items():
        if k == CALIBRATION_KEY:
            continue
        if k == "compressor.stages":
            v = json.dumps(mask(json.loads(v)), sort_keys=True, default=str)
        out[k] = v
    return out


def assign_variants(runs: pd.DataFrame, flats: dict[str, dict[str, str] | None]) -> pd.DataFrame:
    """Columns ``context`` / ``identity`` (hashes), ``model_id`` and ``variant`` (the keys that set a run apart
    from the other runs of its table, as ``key=value``), and the row label ``setting`` (``pr40 {key=value}``
    when the table has more than one configuration). Only completed runs are considered."""
    runs = runs.copy()
    flat_of = [flats.get(d) for d in runs["dir"]]
    runs["identity"] = ["" if f is None else stable_hash(f, 12) for f in flat_of]
    runs["context"] = ["" if f is None else stable_hash(_context(f), 12) for f in flat_of]
    runs["model_id"] = [stable_hash(_model_part(f), 12) for f in flat_of]
    # the run's identity without its calibration source: the runs of one method that differ only in the source
    runs["calibration_id"] = ["" if f is None or CALIBRATION_KEY not in f else stable_hash(_without_source(f), 12)
                              for f in flat_of]
    runs["setting_name"] = runs["setting"]
    runs["variant"] = ""
    done = runs[(runs["status"] == "completed")]
    for _, table in done.groupby(["experiment", "dataset"], sort=False):
        contexts = {c: _context(flats.get(d)) for c, d in zip(table["context"], table["dir"])}
        ctx_keys = _differing([c for c in contexts.values() if c is not None]) if len(contexts) > 1 else []
        no_config = len(contexts) > 1 and any(c is None for c in contexts.values())
        for _, part in table.groupby("setting", sort=False):
            ids = {i: flats.get(d) for i, d in zip(part["identity"], part["dir"])}
            own_keys = _differing([f for f in ids.values() if f is not None]) if len(ids) > 1 else []
            keys = list(dict.fromkeys([*ctx_keys, *own_keys]))
            if not keys and not (no_config or (len(ids) > 1 and any(f is None for f in ids.values()))):
                continue
            for i, r in part.iterrows():
                flat = flats.get(r["dir"])
                full = _variant(flat, keys)
                runs.at[i, "variant"] = full
                if full:
                    runs.at[i, "setting"] = f"{r['setting']} {{{_short(full, keys, flat)}}}"
    return runs


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
        source = row.get("calibration")
        if isinstance(source, str) and source and source != CALIBRATION_DEFAULT:
            setting = f"{setting}@{source}"
    if row["objective"] not in (None, "erm"):
        setting = f"{setting} [{row['objective']}]"
    return setting, family


def base_label(row: pd.Series, reference: str | None) -> str:
    """The row a run is compared with: its own model without compression (a compressed run), or the
    reference model without compression (a checkpoint fine-tuned as is); same objective."""
    if not isinstance(row["compressor"], str):
        return "?"
    model = row["model"] if row["compressor"] != "none" else reference
    return label(pd.Series({**row.to_dict(), "model": model, "compressor": "none", "calibration": None}), reference)[0]


def control_label(row: pd.Series, reference: str | None) -> str | None:
    """The row of the run's matched-compute control (``config.compressor.control``: refit, vtc, distill_ce),
    on the same model and objective; None when the setting declares none."""
    control = row.get("control")
    if not isinstance(control, str) or not control or not isinstance(row["compressor"], str):
        return None
    return label(pd.Series({**row.to_dict(), "compressor": control, "calibration": None}), reference)[0]


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


def _source_rank(source: str) -> tuple[int, str]:
    """natural (no suffix), group_balanced, worst_group, then any other source by name."""
    source = source or CALIBRATION_DEFAULT
    return (CALIBRATION_SOURCES.index(source) if source in CALIBRATION_SOURCES else len(CALIBRATION_SOURCES), source)


def row_order(runs: pd.DataFrame, sweeps: dict[str, list[str]]) -> pd.Series:
    """Each run's row position within its experiment (0 = first row). Per objective (ERM first): the
    ``base`` row, then families alphabetically; within a family the experiment's sweep list (``sweeps``:
    experiment -> row names), then the name's stem (``pr`` of ``pr40``), size (largest first) and name; rows
    of one setting in several configurations (``variant``) and the calibration sources of one method
    (``wanda50``, ``wanda50@group_balanced``, ``wanda50@worst_group``) next to each other."""
    exps = runs["experiment"].map(lambda e: e if isinstance(e, str) else "")  # unreadable runs have none
    settings = runs["setting"].map(str)
    names = (runs["setting_name"] if "setting_name" in runs else runs["setting"]).map(str)
    variants = runs["variant"].map(lambda v: v if isinstance(v, str) else "") if "variant" in runs else \
        pd.Series("", index=runs.index)
    keys: dict[tuple[str, str], tuple] = {}
    for (exp, setting), part in runs.groupby([exps, settings], sort=False):
        name, _, objective = names[part.index[0]].partition(" [")
        name, _, source = name.partition("@")  # the calibration sources of a method: side by side, natural first
        family = str(part["family"].iloc[0])
        listed = sweeps.get(exp, [])
        size = pd.to_numeric(part["size_mb"], errors="coerce").mean()
        keys[(exp, setting)] = (name == "?", objective, family != "none", family,
                                listed.index(name) if name in listed else len(listed),
                                re.sub(r"\d+$", "", name), 0.0 if math.isnan(size) else -round(size, 3),
                                _natural(name), _source_rank(source), variants[part.index[0]])
    rank: dict[tuple[str, str], int] = {}
    for exp in dict.fromkeys(e for e, _ in keys):
        ordered = sorted((k for k in keys if k[0] == exp), key=keys.__getitem__)
        rank.update({k: i for i, k in enumerate(ordered)})
    return pd.Series([rank[k] for k in zip(exps, settings)], index=runs.index, dtype=int)


def _read(f: Path) -> tuple[dict[str, Any] | None, str | None]:
    rec, problem = read_record(f)
    if problem is None and rec is None:
        problem = f"{f}: vanished while the report read it"
    return rec, problem


def collect(paths: Iterable[str | Path] | str | Path, selection: str | None = None) -> Collection:
    """Every results.json under ``paths`` as one table. ``selection``: a validation rule (``val/acc_wg``) to
    re-apply to every run's last fine-tuning from its history (``report.selection``); None: as run."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = find_results(paths)
    rows, records, problems = [], {}, []
    flats: dict[str, dict[str, str] | None] = {}
    sweeps: dict[Any, list[str]] = {}
    for f in files:
        rec, problem = _read(f)  # a half-copied, garbage or `null` file must not sink the report
        row = None
        if rec is not None:
            try:
                row = run_row(f, rec)
                if row["status"] == "completed" and (why := _usable(row)):
                    problem, row = f"{f}: {why}; skipped", None
                elif row["status"] == "completed":
                    row["seed"] = int(row["seed"])
                    flats[row["dir"]] = identity(rec)
            except Exception as exc:  # noqa: BLE001 - a record of the wrong shape: skipped, named
                problem, row = f"{f}: unreadable record ({type(exc).__name__}: {exc}); skipped", None
        if row is None:
            problem = problem or f"{f}: unreadable; skipped"
            problems.append(problem if problem.startswith(str(f)) else f"{f}: {problem}")
            rows.append({"dir": str(f.parent), "status": "unreadable", "error": problem})
            continue
        rows.append(row)
        records[str(f.parent)] = rec
        listed = sweeps.setdefault(row["experiment"], [])
        listed += [n for n in sweep_rows(f.parent, rec) if n not in listed]
    if not rows:
        raise NoResultsError(f"no {RESULTS_FILE} under {', '.join(map(str, paths))}; run a sweep first "
                             f"(make grid) or point the report at the folder it wrote (logs/<experiment>/multirun)")
    runs = pd.DataFrame(rows)
    for col in run_row(Path("x") / RESULTS_FILE, {}).keys():
        if col not in runs:
            runs[col] = None
    runs["seed"] = pd.to_numeric(runs["seed"], errors="coerce").astype("Int64")
    runs["degenerate"] = runs["degenerate"].fillna(False).astype(bool)
    refs = reference_models(runs[runs["status"] == "completed"])
    labels = [label(r, refs.get((r["experiment"], r["dataset"]))) for _, r in runs.iterrows()]
    runs["setting"] = [s for s, _ in labels]
    runs["family"] = [f for _, f in labels]
    runs["base_setting"] = [base_label(r, refs.get((r["experiment"], r["dataset"]))) for _, r in runs.iterrows()]
    runs["control_setting"] = [control_label(r, refs.get((r["experiment"], r["dataset"]))) for _, r in runs.iterrows()]
    runs["reference_model"] = [refs.get((r["experiment"], r["dataset"])) for _, r in runs.iterrows()]
    runs = assign_variants(runs, flats)
    reselected: dict[str, sel.Reselection] = {}
    runs["selected_epoch"], runs["selection"] = math.nan, None
    runs["selection"] = runs["selection"].astype(object)
    for i, r in runs[runs["status"] == "completed"].iterrows():
        try:
            again = sel.reselect(records[r["dir"]], selection)
        except Exception as exc:  # noqa: BLE001 - a history of the wrong shape: the run keeps its own epoch
            again = sel.Reselection("no_history" if selection else "own", detail=f"{type(exc).__name__}: {exc}")
            if selection:
                problems.append(f"{Path(r['dir']) / RESULTS_FILE}: unreadable history ({type(exc).__name__}); "
                                "the run keeps its own epoch")
        reselected[r["dir"]] = again
        runs.at[i, "selected_epoch"] = again.epoch if again.epoch is not None else math.nan
        runs.at[i, "selection"] = again.status
        if again.changed:
            runs.at[i, "acc_avg"] = again.test.get("test/acc_avg", math.nan)
            runs.at[i, "acc_wg"] = again.test.get("test/acc_wg", math.nan)
    runs["used"] = _latest_completed(runs)
    runs["row_order"] = row_order(runs, sweeps)
    order = ["status", "used", *KEY, "family", "row_order", "base_setting", "control_setting", "model", "compressor",
             "objective", "calibration", "task", "size_mb", "params", "acc_avg", "acc_wg", *MULTILABEL_METRICS,
             "acc_worst_class", "flip_rate", "kl",
             "probe_acc_wg", "degenerate", "degenerate_reasons", "val_acc_avg", "val_acc_wg", "worst_group",
             "base_acc_avg", "base_acc_wg", "selection", "selected_epoch", "monitor", "variant", "code", "seconds",
             "started", "finished", "error", "reference_model", "run_id", "identity", "context", "predictions", "dir"]
    runs = runs[order + [c for c in runs.columns if c not in order]]
    return Collection(runs=runs.sort_values([*KEY, "dir"], na_position="last").reset_index(drop=True),
                      records=records, problems=problems, selection=selection, reselected=reselected)


def _latest_completed(runs: pd.DataFrame) -> pd.Series:
    """One completed run per experiment/dataset/setting/seed: the last finished (reruns supersede)."""
    used = pd.Series(False, index=runs.index)
    done = runs[runs["status"] == "completed"]
    for _, part in done.groupby(KEY, dropna=False):
        used[part.sort_values("finished", na_position="first").index[-1]] = True
    return used


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in runs["status"].value_counts().items()}
