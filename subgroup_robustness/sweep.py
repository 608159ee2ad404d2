"""Sweep progress as a Hydra callback (which job is running, how many are done, skipped and failed), and
the job folder names of the grid experiments.

The counts live in small files under ``<sweep dir>/.progress/`` rather than in this object, because jobs
run in other processes (joblib) or on other machines (submitit); every job reads them back to print where
the whole sweep stands. The grid experiments enable it; for any other sweep add
``+hydra.callbacks.sweep_progress._target_=subgroup_robustness.sweep.SweepProgress``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from subgroup_robustness.results import RESULTS_FILE, is_completed, read_results
from subgroup_robustness.utils.compose import is_multirun
from subgroup_robustness.utils.console import console
from subgroup_robustness.utils.io import atomic_write_json, read_json

PROGRESS_DIR = ".progress"
STATES = ("done", "skipped", "failed", "running")


def count_jobs(config: DictConfig) -> int | None:
    """Jobs the basic sweeper will launch: the product of the sweep lists (command line over config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.get("sweeper") or {}
    if "basic_sweeper" not in str(sweeper.get("_target_", "")):
        return None  # e.g. optuna decides the number of trials itself
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args += list(config.hydra.overrides.task)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - progress must never stop a sweep
        return None
    sizes: dict[str, int] = {}
    for o in overrides:
        sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_discrete_sweep() else 1
    return math.prod(sizes.values()) if sizes else 1


def _job_label(config: DictConfig) -> str:
    """The job's folder inside the sweep (short and unique), else its overrides."""
    try:
        return os.path.relpath(config.hydra.runtime.output_dir, os.path.abspath(config.hydra.sweep.dir))
    except (ValueError, TypeError):
        return ",".join(config.hydra.overrides.task) or "(no overrides)"


def job_state(output_dir: Path, started_complete: bool, hydra_failed: bool) -> tuple[str, str | None]:
    """The outcome of one finished job, read from its results.json."""
    path = output_dir / RESULTS_FILE
    if is_completed(path):
        return ("skipped" if started_complete else "done"), None
    try:
        rec = read_results(path)
    except (OSError, ValueError):
        return "failed", "the job raised" if hydra_failed else "no results.json was written"
    err = rec.get("error")
    if not err:
        return "failed", f"results.json was left at status {rec.get('status')!r}"
    return "failed", f"{err.get('type', 'error')}: {err.get('message', '')}"


class SweepProgress(Callback):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._started: dict[int, float] = {}

    # ---- state files --------------------------------------------------------------------------------
    @staticmethod
    def _dir(config: DictConfig) -> Path:
        return Path(config.hydra.sweep.dir) / PROGRESS_DIR

    @staticmethod
    def _job_num(config: DictConfig) -> int:
        return int(config.hydra.job.get("num") or 0)

    @classmethod
    def tally(cls, folder: Path) -> dict[str, Any]:
        counts = dict.fromkeys(STATES, 0)
        jobs = []
        for f in sorted(folder.glob("job-*.json")):
            try:
                info = read_json(f)
            except (OSError, ValueError):
                continue
            counts[info.get("state", "running")] = counts.get(info.get("state", "running"), 0) + 1
            jobs.append(info)
        try:
            total = read_json(folder / "total.json").get("total")
        except (OSError, ValueError):
            total = None
        return {"counts": counts, "jobs": jobs, "total": total}

    def _line(self, config: DictConfig, verb: str, detail: str = "") -> None:
        if self.quiet:
            return
        t = self.tally(self._dir(config))
        c, total = t["counts"], t["total"]
        finished = c["done"] + c["skipped"] + c["failed"]
        left = f" · left {total - finished - c['running']}" if total else ""
        n = self._job_num(config) + 1
        pos = f"{n}/{total}" if total else f"{n}"
        console.print(f"[bold cyan]\\[sweep {pos}][/bold cyan] {verb} {escape(_job_label(config))}{escape(detail)}  "
                      f"[dim](done {c['done']} · skipped {c['skipped']} · failed {c['failed']} · "
                      f"running {c['running']}{left})[/dim]", soft_wrap=True)

    # ---- Hydra hooks ----------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = self._dir(config)
        shutil.rmtree(folder, ignore_errors=True)  # a relaunch counts afresh; finished jobs report skipped
        total = count_jobs(config)
        atomic_write_json(folder / "total.json", {"total": total, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if not self.quiet:
            console.print(f"[bold cyan]\\[sweep][/bold cyan] {total if total is not None else 'an unknown number of'} "
                          f"jobs -> {config.hydra.sweep.dir}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        out = Path(config.hydra.runtime.output_dir)
        will_skip = bool(config.get("skip_existing", True)) and is_completed(out / RESULTS_FILE)
        num = self._job_num(config)
        self._started[num] = time.perf_counter()
        atomic_write_json(self._dir(config) / f"job-{num:05d}.json",
                          {"num": num, "job": _job_label(config), "dir": str(out), "state": "running",
                           "will_skip": will_skip})
        self._line(config, "skipping (complete)" if will_skip else "running")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        num = self._job_num(config)
        path = self._dir(config) / f"job-{num:05d}.json"
        try:
            info = read_json(path)
        except (OSError, ValueError):
            info = {"num": num, "job": _job_label(config), "dir": config.hydra.runtime.output_dir, "will_skip": False}
        failed = job_return is not None and job_return.status == JobStatus.FAILED
        state, error = job_state(Path(info["dir"]), info.get("will_skip", False), failed)
        seconds = time.perf_counter() - self._started.pop(num, time.perf_counter())
        info.update(state=state, error=error, seconds=round(seconds, 1))
        atomic_write_json(path, info)
        detail = f" in {seconds:.0f} s" if state == "done" else ""
        if error:
            detail += f": {error.splitlines()[0][:200]}"
        self._line(config, {"done": "[green]done[/green]", "skipped": "[green]skipped[/green]",
                            "failed": "[bold red]FAILED[/bold red]"}[state], detail)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        t = self.tally(self._dir(config))
        c = t["counts"]
        summary = {"total": t["total"], **c, "failed_jobs": [
            {"job": j["job"], "dir": j["dir"], "error": j.get("error")} for j in t["jobs"] if j.get("state") == "failed"]}
        atomic_write_json(Path(config.hydra.sweep.dir) / "sweep_summary.json", summary)
        if self.quiet:
            return
        console.print(f"[bold cyan]\\[sweep][/bold cyan] finished: done {c['done']} · skipped {c['skipped']} · "
                      f"failed {c['failed']} (of {t['total']})")
        for j in summary["failed_jobs"]:
            console.print(f"  [red]failed[/red] {escape(j['job'])}: {escape(str(j['error']))}\n    {j['dir']}", soft_wrap=True)
        console.print(f"  report: python -m subgroup_robustness.report {config.hydra.sweep.dir}", soft_wrap=True)
