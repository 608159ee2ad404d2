"""The two files a run leaves, and the only contract between running and reporting: results.json (one
record per run, written atomically, the single source for reports and skipping) and predictions.npz (every
test prediction with its example's label and attribute values, so groups and significance can be
recomputed without a re-run). Both formats' writers and readers live here; ``report/`` only reads."""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path
from typing import Any

import io
from typing import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

import numpy as np

from subgroup_robustness.utils.errors import CorruptDataError
from subgroup_robustness.utils.io import atomic_write_bytes, atomic_write_json, read_json, read_json_record

# not part of what a run computes: where it writes, how it logs, what it measures besides the metrics
RUN_KEYS_EXCLUDED = ("paths", "logger", "hydra", "print_config", "skip_existing", "cache_base", "measure",
                     "checkpoint")


def identity_payload(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What changes a run's results: the resolved config without paths, logging and measurement knobs;
    callbacks count (early stopping and selection change the model), the progress bar does not."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out = {k: v for k, v in c.items() if k not in RUN_KEYS_EXCLUDED}
    if not out.get("eval_datasets"):  # none: the same identity as before the key existed
        out.pop("eval_datasets", None)
    if isinstance(out.get("callbacks"), dict):
        out["callbacks"] = {k: v for k, v in out["callbacks"].items() if "progress" not in k}
    if isinstance(out.get("data"), dict):  # how batches are loaded, not what they hold
        out["data"] = {k: v for k, v in out["data"].items() if k != "num_workers"}
    return _without_cache_dirs(out)


def _without_cache_dirs(obj: Any) -> Any:
    """Where downloads and caches live (``SR_CACHE_DIR``) does not change a result: every ``cache_dir`` key
    is left out of the identity, so moving the cache re-runs nothing."""
    if isinstance(obj, dict):
        return {k: _without_cache_dirs(v) for k, v in obj.items() if k != "cache_dir"}
    if isinstance(obj, list):
        return [_without_cache_dirs(v) for v in obj]
    return obj


SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.npz"
REQUIRED_KEYS = ("schema_version", "status", "run_id", "run", "metrics", "groups", "model", "compression",
                 "timing", "config")


_CODE: dict[str, Any] | None = None


def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit and whether the tree had local changes: the
    report says when rows of one table come from different code."""
    global _CODE
    if _CODE is None:
        import subprocess

        import subgroup_robustness

        root = Path(subgroup_robustness.__file__).resolve().parents[1]
        commit, dirty = None, None
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
            if commit:
                status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=5).stdout
                dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE = {"version": subgroup_robustness.__version__, "git_commit": commit, "dirty": dirty}
    return dict(_CODE)


def base_record(run_id: str, run: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "run_id": run_id,
        "run": run,
        "metrics": {},
        "groups": {},
        "model": {},
        "base": None,
        "compression": {"stages": []},
        "timing": {},
        "config": config,
        "host": {"hostname": socket.gethostname(), "python": platform.python_version()},
        "code": code_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_json(path, record)


def read_results(path: str | Path) -> dict[str, Any]:
    return read_json(path)


def read_record(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, problem): the record at ``path`` (None when missing), or (None, one line) when the file holds
    anything but a JSON object — such a job is treated as not done and re-run."""
    try:
        return read_json_record(path), None
    except CorruptDataError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path}: unreadable ({exc.strerror or exc})"


def is_completed(path: str | Path) -> bool:
    rec, _ = read_record(path)
    return bool(rec) and rec.get("status") == "completed"


# ---- predictions.npz ----------------------------------------------------------------------------------
def _small_int(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int16 if a.size == 0 or (a.min() >= -(2 ** 15) and a.max() < 2 ** 15) else np.int32)


def example_metadata(table, columns: Sequence[str], index: np.ndarray) -> dict[str, np.ndarray]:
    """The label/attribute values of the examples ``index`` (row ids of the data module's table), for
    predictions.npz. Read from the table, not from the tokenized splits, so every path that produced the
    model (base cache included) writes them; empty when the ids do not fit the table."""
    if table is None or len(index) == 0 or int(index.max()) >= len(table) or int(index.min()) < 0:
        return {}
    meta = table[list(columns)].to_numpy()[index]
    return {"metadata": _small_int(np.asarray(meta)), "metadata_columns": np.asarray(list(columns))}


def write_predictions(path: str | Path, index: np.ndarray, label: np.ndarray, pred: np.ndarray,
                      metadata: Mapping[str, np.ndarray] | None = None, **extra: np.ndarray) -> Path:
    """predictions.npz (compressed, atomic), rows sorted by example id."""
    return atomic_write_bytes(path, encode_predictions(index, label, pred, metadata, **extra))


def encode_predictions(index: np.ndarray, label: np.ndarray, pred: np.ndarray,
                       metadata: Mapping[str, np.ndarray] | None = None, **extra: np.ndarray) -> bytes:
    """The bytes of a predictions.npz: index, label, pred (int32), metadata (+ its column names) and any
    per-example ``extra`` arrays (e.g. ``probs``: (N, C) float16), rows sorted by example id."""
    order = np.argsort(index, kind="stable")
    arrays = {"index": index[order].astype(np.int32), "label": label[order].astype(np.int32),
              "pred": pred[order].astype(np.int32)}
    for k, v in {**(metadata or {}), **extra}.items():
        arrays[k] = v if k == "metadata_columns" else np.asarray(v)[order]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a predictions.npz (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
