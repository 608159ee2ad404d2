"""results.json: one file per run, written atomically, the single source for reports and skipping."""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path
from typing import Any

from subgroup_robustness.utils.io import atomic_write_json, read_json

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
REQUIRED_KEYS = ("schema_version", "status", "run_id", "run", "metrics", "groups", "model", "compression",
                 "timing", "config")


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
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_json(path, record)


def read_results(path: str | Path) -> dict[str, Any]:
    return read_json(path)


def is_completed(path: str | Path) -> bool:
    try:
        return read_json(path).get("status") == "completed"
    except (OSError, ValueError):
        return False
