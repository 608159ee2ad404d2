"""Sweep progress as a Hydra callback (one line per job: which job, where the whole grid stands, an ETA),
the sweep summary, and the job folder names of the grid experiments.

The counts live in small files under ``<sweep dir>/.progress/<launch>/`` rather than in this object,
because jobs run in other processes (joblib) or on other machines (submitit); every job reads them back to
print where the whole sweep stands. One folder per launch, so a relaunch while an earlier launch's jobs
still run (on SLURM) never mixes the two counts. The launchers of ``subgroup_robustness.launchers`` write
the states of jobs they did not start (complete already, live elsewhere) and of jobs SLURM ended (cancelled,
timed out, out of memory). ``sweep_summary.json`` is written at the start (``"state": "running"``) and at
the end of every launch, so it is never left stale. The grid experiments enable the callback; for any other
sweep add ``+hydra.callbacks.sweep_progress._target_=subgroup_robustness.sweep.SweepProgress``.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.markup import escape

from subgroup_robustness.results import RESULTS_FILE, is_completed, read_results
from subgroup_robustness.utils.compose import is_multirun
from subgroup_robustness.utils.console import console
from subgroup_robustness.utils.io import atomic_write_json, read_json
from subgroup_robustness.utils.resolvers import job_dirname  # noqa: F401  (the grid's job folder names)

PROGRESS_DIR = ".progress"
SUMMARY_FILE = "sweep_summary.json"
PROGRESS_ENV = "SR_SWEEP_PROGRESS"  # this launch's progress folder, for the jobs (set by on_multirun_start)
STATES = ("done", "skipped", "failed", "elsewhere", "running")
FINAL = ("done", "skipped", "failed", "elsewhere")
KEEP_LAUNCHES = 5


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


def live_owner(output_dir: Path) -> str | None:
    """A phrase naming the live process that owns a job folder (its JobLock), or None."""
    from subgroup_robustness.utils.locks import JobLock

    try:
        state = JobLock(output_dir).state()
    except OSError:
        return None
    return state.describe() if state.exists and state.alive else None


def _complete_and_same(config: DictConfig, path: Path) -> bool:
    """The job will be skipped: its results.json is complete AND has this job's run identity (a complete
    result of another config is re-run, so it must not be announced as skipped)."""
    if not is_completed(path):
        return False
    try:
        from subgroup_robustness.launchers import is_complete_result, without_hydra
        from subgroup_robustness.preflight import expand_chain
        from subgroup_robustness.results import read_record

        task = without_hydra(config)
        expand_chain(task)
        return is_complete_result(task, read_record(path)[0])
    except Exception:  # noqa: BLE001 - progress lines must never stop a job: say "running" when unsure
        return False


def job_state(output_dir: Path, started_complete: bool, hydra_failed: bool) -> tuple[str, str | None]:
    """The outcome of one finished job, read from its results.json (and its lock: a job that found its
    folder owned by a live process elsewhere is ``elsewhere``, not failed)."""
    path = output_dir / RESULTS_FILE
    if is_completed(path):
        return ("skipped" if started_complete else "done"), None
    owner = live_owner(output_dir)
    if owner:
        return "elsewhere", f"being run by {owner}"
    try:
        rec = read_results(path)
    except (OSError, ValueError):
        return "failed", "the job raised" if hydra_failed else "no results.json was written"
    err = rec.get("error")
    if not err:
        return "failed", f"results.json was left at status {rec.get('status')!r}"
    return "failed", f"{err.get('type', 'error')}: {err.get('message', '')}"


# ---- progress files (shared with the launchers) ---------------------------------------------------------
def progress_folder(sweep_dir: str | os.PathLike) -> Path:
    """This launch's progress folder: the one ``on_multirun_start`` made (passed on to the jobs in the
    environment), else ``<sweep dir>/.progress`` (a sweep without the callback)."""
    root = Path(sweep_dir) / PROGRESS_DIR
    env = os.environ.get(PROGRESS_ENV)
    if env and os.path.abspath(Path(env).parent) == os.path.abspath(root):  # not a previous sweep's
        return Path(env)
    return root


def record_state(folder: Path, num: int, job: str, out_dir: str, state: str, error: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Write (or update) the state file of job ``num``; returns its content."""
    path = Path(folder) / f"job-{int(num):05d}.json"
    try:
        info = read_json(path)
    except (OSError, ValueError):
        info = {}
    info.update({"num": int(num), "job": job, "dir": str(out_dir), "state": state, "error": error}, **extra)
    atomic_write_json(path, info)
    return info


def tally(folder: Path) -> dict[str, Any]:
    """Counts by state, the jobs' records, the total and an ETA (seconds, or None) for one launch."""
    counts = dict.fromkeys(STATES, 0)
    jobs = []
    for f in sorted(Path(folder).glob("job-*.json")):
        try:
            info = read_json(f)
        except (OSError, ValueError):
            continue
        state = info.get("state", "running")
        counts[state] = counts.get(state, 0) + 1
        jobs.append(info)
    try:
        meta = read_json(Path(folder) / "total.json")
    except (OSError, ValueError):
        meta = {}
    total = meta.get("total")
    durations = [j["seconds"] for j in jobs if j.get("state") == "done" and isinstance(j.get("seconds"), (int, float))]
    try:
        elapsed = time.time() - time.mktime(time.strptime(str(meta.get("started")), "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError, OverflowError):
        elapsed = None
    return {"counts": counts, "jobs": jobs, "total": total,
            "eta_s": eta_seconds(counts, total, durations, elapsed=elapsed), "started": meta.get("started")}


def eta_seconds(counts: dict[str, int], total: int | None, durations: list[float],
                parallel: int | None = None, elapsed: float | None = None) -> float | None:
    """Time left. With ``elapsed`` (wall seconds since the launch began): that time per job run so far
    (done or failed), times the jobs not finished, whatever ran side by side. Otherwise the mean duration
    of the jobs done, times the jobs left, over the jobs running at once (at least one): between two jobs of
    a two-worker grid that count drops to 1 and the estimate doubles. None before any job is done."""
    if not total or not durations:
        return None
    left = total - sum(counts.get(s, 0) for s in FINAL)
    if left <= 0:
        return 0.0
    ran = counts.get("done", 0) + counts.get("failed", 0)
    if elapsed is not None and elapsed > 0 and ran:
        return elapsed / ran * left
    mean = sum(durations) / len(durations)
    return mean * left / max(1, parallel if parallel is not None else counts.get("running", 0))


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    if seconds < 90:
        return f"ETA ~{seconds:.0f} s"
    if seconds < 5400:
        return f"ETA ~{seconds / 60:.0f} min"
    return f"ETA ~{seconds / 3600:.1f} h"


def counts_text(c: dict[str, int], total: int | None, eta: float | None, pending: int | None = None) -> str:
    finished = sum(c.get(s, 0) for s in FINAL)
    parts = [f"done {c.get('done', 0)}", f"skipped {c.get('skipped', 0)}", f"failed {c.get('failed', 0)}"]
    if c.get("elsewhere"):
        parts.append(f"elsewhere {c['elsewhere']}")
    parts.append(f"running {c.get('running', 0)}")
    if pending is not None:
        parts.append(f"pending {pending}")
    head = f"{finished}/{total}" if total else f"{finished}"
    return f"{head} finished · " + " · ".join(parts) + f" · {fmt_eta(eta)}"


def write_summary(sweep_dir: str | os.PathLike, folder: Path | None = None, state: str = "finished",
                  **extra: Any) -> dict[str, Any]:
    """``<sweep dir>/sweep_summary.json`` from a launch's progress files: counts, failed jobs with their
    reasons, jobs left to another live launch."""
    folder = Path(folder) if folder is not None else progress_folder(sweep_dir)
    t = tally(folder)
    c = t["counts"]
    summary = {"state": state, "total": t["total"], **c, "launch": folder.name, "started": t["started"],
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "failed_jobs": [{"job": j["job"], "dir": j["dir"], "error": j.get("error"),
                                **({"slurm": j["slurm"]} if j.get("slurm") else {})}
                               for j in t["jobs"] if j.get("state") == "failed"],
               "elsewhere_jobs": [{"job": j["job"], "dir": j["dir"], "owner": j.get("error")}
                                  for j in t["jobs"] if j.get("state") == "elsewhere"], **extra}
    atomic_write_json(Path(sweep_dir) / SUMMARY_FILE, summary)
    return summary


def _prune_launches(root: Path, keep: int = KEEP_LAUNCHES) -> None:
    """Keep the newest launches' progress folders (an older launch may still be collecting on SLURM)."""
    try:
        launches = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    except OSError:
        return
    for old in launches[:-keep] if len(launches) > keep else []:
        shutil.rmtree(old, ignore_errors=True)


class SweepProgress(Callback):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._started: dict[int, float] = {}

    # ---- state files --------------------------------------------------------------------------------
    @staticmethod
    def _dir(config: DictConfig) -> Path:
        return progress_folder(config.hydra.sweep.dir)

    @staticmethod
    def _job_num(config: DictConfig) -> int:
        return int(config.hydra.job.get("num") or 0)

    tally = staticmethod(tally)

    def _line(self, config: DictConfig, verb: str, detail: str = "") -> None:
        if self.quiet:
            return
        t = tally(self._dir(config))
        console.print(f"[bold cyan]\\[sweep {self._job_num(config) + 1}/{t['total'] or '?'}][/bold cyan] {verb} "
                      f"{escape(_job_label(config))}{escape(detail)}  "
                      f"[dim]({counts_text(t['counts'], t['total'], t['eta_s'])})[/dim]", soft_wrap=True)

    # ---- Hydra hooks ----------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        root = sweep_dir / PROGRESS_DIR
        for legacy in root.glob("*.json") if root.is_dir() else []:  # the single-folder layout of old versions
            legacy.unlink(missing_ok=True)
        launch = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname().split('.')[0]}-{os.getpid()}"
        folder = root / launch
        total = count_jobs(config)
        atomic_write_json(folder / "total.json", {"total": total, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                  "host": socket.gethostname(), "pid": os.getpid()})
        os.environ[PROGRESS_ENV] = str(folder)  # the jobs (joblib workers, submitit jobs) write here
        _prune_launches(root)
        write_summary(sweep_dir, folder, state="running")  # never leave the previous launch's summary standing
        if not self.quiet:
            console.print(f"[bold cyan]\\[sweep][/bold cyan] {total if total is not None else 'an unknown number of'} "
                          f"jobs -> {config.hydra.sweep.dir}", soft_wrap=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        out = Path(config.hydra.runtime.output_dir)
        will_skip = bool(config.get("skip_existing", True)) and _complete_and_same(config, out / RESULTS_FILE)
        num = self._job_num(config)
        self._started[num] = time.perf_counter()
        extra = {"will_skip": will_skip, "host": socket.gethostname()}
        slurm_id = os.environ.get("SLURM_JOB_ID")
        if slurm_id:
            extra["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID") and \
                f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" or slurm_id
        record_state(self._dir(config), num, _job_label(config), str(out), "running", **extra)
        where = f" (SLURM job {extra['slurm_job_id']} on {extra['host']})" if slurm_id else ""
        self._line(config, "skipping (complete)" if will_skip else "running", where)

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
                            "elsewhere": "[yellow]live elsewhere[/yellow]",
                            "failed": "[bold red]FAILED[/bold red]"}[state], detail)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = write_summary(config.hydra.sweep.dir, self._dir(config))
        if self.quiet:
            return
        c = summary
        console.print(f"[bold cyan]\\[sweep][/bold cyan] finished: done {c['done']} · skipped {c['skipped']} · "
                      f"failed {c['failed']}" + (f" · live elsewhere {c['elsewhere']}" if c.get("elsewhere") else "")
                      + f" (of {c['total']})", soft_wrap=True)
        for j in summary["failed_jobs"]:
            console.print(f"  [red]failed[/red] {escape(j['job'])}: {escape(str(j['error']))}\n    {j['dir']}", soft_wrap=True)
        for j in summary["elsewhere_jobs"]:
            console.print(f"  [yellow]live elsewhere[/yellow] {escape(j['job'])}: {escape(str(j['owner']))}", soft_wrap=True)
        console.print(f"  report: python -m subgroup_robustness.report {config.hydra.sweep.dir}", soft_wrap=True)
