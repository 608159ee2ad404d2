"""``write_fake_run`` with the fields results.json gained since the report was first written (config with the
compressor's control, degenerate flag, code version, per-epoch history, extra metrics, probe, probabilities),
and small readers of what the report writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import write_fake_run


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fake_run(folder: Path, *, control: str | None = None, config: dict | None = None,
             degenerate: str | None = None, code: dict | None = None, phases: list | None = None,
             stages: list | None = None, test_metrics: dict | None = None, probe: dict | None = None,
             probs: bool = False, **kw: Any) -> dict:
    """A completed (or other) fake run; ``control`` is ``config.compressor.control``, ``config`` is merged
    into the record's config, ``degenerate`` a reason (flags the run)."""
    write_fake_run(folder, **kw)
    path = folder / "results.json"
    rec = json.loads(path.read_text())
    run = rec["run"]
    rec["config"]["compressor"] = {"name": run["compressor"], "family": run["family"], "control": control}
    rec["config"]["model"] = {"name": run["model"]}
    rec["config"] = _merge(rec["config"], config or {})
    if degenerate:
        rec["degenerate"] = {"degenerate": True, "reasons": [degenerate], "majority_fraction": 1.0, "zero_fraction": {}}
    elif rec["status"] == "completed":
        rec["degenerate"] = {"degenerate": False, "reasons": [], "majority_fraction": 0.5, "zero_fraction": {}}
    if code is not None:
        rec["code"] = code
    if phases is not None:
        rec["phases"] = phases
    if stages is not None:
        rec["compression"]["stages"] = stages
    if test_metrics:
        rec["metrics"]["test"].update(test_metrics)
    if probe:
        rec["metrics"]["probe"] = probe
    path.write_text(json.dumps(rec, indent=1))
    if probs and rec["status"] == "completed":
        npz = folder / "predictions.npz"
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        p = np.full((len(arrays["pred"]), 2), 0.2, np.float16)
        p[np.arange(len(p)), arrays["pred"]] = 0.8
        np.savez_compressed(npz, **arrays, probs=p)
    return rec


def set_predictions(folder: Path, pred: np.ndarray) -> None:
    """Replace a fake run's predictions (rows in the saved order)."""
    npz = folder / "predictions.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred"] = np.asarray(pred, np.int32)
    np.savez_compressed(npz, **arrays)


def md_table(path: Path, which: int = 0) -> dict[str, dict[str, str]]:
    """The ``which``-th markdown table of a file: first cell -> {column: cell}."""
    tables, current = [], []
    for ln in path.read_text().splitlines():
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    lines = tables[which]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def history(epochs: list[tuple[float, float, float, float]], groups: dict[int, dict[str, float]] | None = None
            ) -> list[dict]:
    """Per epoch (val acc_avg, val acc_wg, test acc_avg, test acc_wg) -> GroupMetrics.history entries."""
    out = []
    for i, (va, vw, ta, tw) in enumerate(epochs):
        test = {"test/acc_avg": ta, "test/acc_wg": tw}
        test.update({f"test/acc/{g}": v for g, v in ((groups or {}).get(i) or {}).items()})
        out.append({"epoch": i, "step": 10 * (i + 1), "val": {"val/acc_avg": va, "val/acc_wg": vw}, "test": test})
    return out
