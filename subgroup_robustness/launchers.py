"""The grid as a job graph: Hydra launchers that plan a sweep before they start anything.

``hydra/launcher=basic_graph`` (the default of every sweep here), ``local`` (joblib processes), ``slurm``
(GPU) and ``slurm_cpu``. Hydra finds launchers only in the ``hydra_plugins`` namespace, so the classes
Hydra instantiates are thin subclasses in ``hydra_plugins/subgroup_robustness_launchers``; the work is here.

The plan (:func:`plan_jobs`), made on the launching machine from every job's composed config:

* **complete**: a completed results.json of the same run identity (skip_existing) -> not launched, not
  queued: reported ``skipped``. Host-dependent values (``trainer.precision: auto`` resolves per machine) are
  taken from the stored result, so a login node without a GPU recognises a GPU job's result;
* **live elsewhere**: its folder's owner lock is held by a live process (an earlier launch still running it)
  -> not launched: reported ``elsewhere`` (the job's own JobLock still refuses a second owner, should one
  start between the plan and the run);
* the rest is ordered: a job that fine-tunes a base (``compressor=none``: it fills the base cache) before
  the jobs of the grid that start from that base. Without such a job in the grid, the first job needing an
  uncached base fills it and the other jobs of that base follow it. No job then waits on the cache's lock.

The orderings: ``basic_graph`` runs bases first; ``local`` runs the bases in parallel, then the rest; SLURM
submits every job as its own sbatch (so it is named ``<dataset>-<setting>-s<seed>`` in squeue) with
``--dependency=afterany:<its base's job id>``, and ``array_parallelism`` as lanes (job k also waits for job
k-N, so at most N run at once). afterany, not afterok: a failed base is retried by the first job needing it.

SLURM outcomes: the submitting command waits, printing one grid progress line whenever the counts change
(done, skipped, failed, running, pending, ETA). A job SLURM ends without a result (scancel, time limit, out
of memory, node failure) is recorded in its results.json (``status: failed``, ``error.type: "SLURM
<STATE>"``, the reason, and a ``slurm`` section), the sweep goes on, and the sweep summary is written even
when the submitting command is interrupted.

Requeue (timeouts and preemption): SLURM signals USR2 ``signal_delay_s`` before the time limit (and at a
preemption); the job is then requeued, at most ``max_requeue`` times per launch, into the same folder, where
the run resumes from its last epoch checkpoint. The requeued job sees ``SR_JOB_ATTEMPT`` (1, 2, ...) and
``SR_RESUME=1``; its results.json says ``status: requeued`` in between. Past the bound, the signal is noted
and the job runs on until it finishes or SLURM stops it at the limit (then recorded as TIMEOUT).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

RUN, SKIP, ELSEWHERE = "run", "skip", "elsewhere"
BASE, DEPENDENT, FREE = "base", "dependent", "free"
# resolvers whose value depends on the machine that resolves the config (see plan: identity check)
HOST_DEPENDENT = ("${sr.precision",)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "REVOKED", "SPECIAL_EXIT", "LOST"}
ATTEMPT_ENV, RESUME_ENV = "SR_JOB_ATTEMPT", "SR_RESUME"


# ---- the plan --------------------------------------------------------------------------------------------
@dataclass
class PlannedJob:
    idx: int                      # hydra.job.num
    overrides: list[str]
    out_dir: str = ""
    label: str = ""               # the folder inside the sweep
    name: str = "job"             # <dataset>-<setting>-s<seed>
    action: str = RUN             # run | skip | elsewhere
    reason: str = ""
    role: str = FREE              # base (fills the base cache) | dependent (starts from it) | free
    base_key: str | None = None
    cache_root: str | None = None
    after: int | None = None      # idx of the job this one follows
    run_id: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    value: float = math.nan       # a skipped job's optimized metric
    problem: str = ""             # why the plan could not be made (the job then runs and reports it)


def job_name(task: DictConfig, overrides: Sequence[str]) -> str:
    """``<dataset>-<setting>-s<seed>``: the ``setting=`` override, else the compressor (with the model when
    the model is swept)."""
    kv = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    setting = kv.get("setting")
    if not setting:
        setting = str(OmegaConf.select(task, "compressor.name", default="job"))
        if "model" in kv:
            setting = f"{OmegaConf.select(task, 'model.name', default=kv['model'])}-{setting}"
    name = f"{OmegaConf.select(task, 'dataset.name', default='data')}-{setting}-s{OmegaConf.select(task, 'seed', default=0)}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:100]


def _host_dependent_keys(task: DictConfig) -> list[str]:
    raw = OmegaConf.to_container(task, resolve=False)
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, str) and any(h in node for h in HOST_DEPENDENT):
            found.append(prefix[:-1])

    walk(raw, "")
    return found


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return KeyError
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def same_identity(task: DictConfig, previous: dict[str, Any]) -> bool:
    """Whether ``previous`` (a stored record) has the run identity ``task`` would get, with the values of
    host-dependent resolvers taken from the stored config (a GPU job's ``auto`` precision is not this
    machine's)."""
    from subgroup_robustness.experiment import identity_payload
    from subgroup_robustness.utils.io import stable_hash

    payload = identity_payload(task)
    stored = previous.get("config") or {}
    for key in _host_dependent_keys(task):
        value = _get(stored, key)
        if value is not KeyError and _get(payload, key) is not KeyError:
            _set(payload, key, value)
    return stable_hash(payload, 16) == previous.get("run_id")


def without_hydra(cfg: DictConfig) -> DictConfig:
    """A job's own config: a copy of its sweep config without the ``hydra`` node (what the task receives)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def is_complete_result(task: DictConfig, previous: dict[str, Any] | None) -> bool:
    """``previous`` (a stored record) is a completed result of this very job (same run identity), so the job
    is skipped when ``skip_existing`` holds. ``task``: the job's config with its chain expanded."""
    return bool(previous) and previous.get("status") == "completed" and same_identity(task, previous)


def _plan_one(job: PlannedJob, config: DictConfig, config_loader: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from subgroup_robustness.results import RESULTS_FILE, read_record

    cfg = config_loader.load_sweep_config(config, list(job.overrides))
    with open_dict(cfg):
        cfg.hydra.job.num = job.idx
        cfg.hydra.job.id = f"plan_{job.idx}"
    sweep_dir = str(OmegaConf.select(cfg, "hydra.sweep.dir"))
    out = os.path.abspath(os.path.join(sweep_dir, str(OmegaConf.select(cfg, "hydra.sweep.subdir"))))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = out
    HydraConfig.instance().set_config(cfg)
    job.out_dir, job.label = out, os.path.relpath(out, os.path.abspath(sweep_dir))
    task = without_hydra(cfg)
    job.name = job_name(task, job.overrides)

    from subgroup_robustness.experiment import build_stages, run_identity, run_summary, starts_from_base
    from subgroup_robustness.preflight import expand_chain

    expand_chain(task)
    job.summary = run_summary(task)
    job.run_id = run_identity(task)
    previous, _ = read_record(Path(out) / RESULTS_FILE)
    if task.get("skip_existing", True) and is_complete_result(task, previous):
        job.action, job.reason = SKIP, "complete"
        metric = task.get("optimized_metric", "val/acc_wg")
        value = ((previous.get("metrics") or {}).get("val") or {}).get(metric)
        job.value = float(value) if isinstance(value, (int, float)) else math.nan
        return
    from subgroup_robustness.sweep import live_owner

    owner = live_owner(Path(out))
    if owner:
        job.action, job.reason = ELSEWHERE, f"being run by {owner}"
        return
    stages = build_stages(task.compressor)
    if starts_from_base(task, stages):
        from subgroup_robustness.models.base_cache import base_key

        job.role = DEPENDENT if stages else BASE
        job.base_key = base_key(task)
        job.cache_root = str(Path(str(task.paths.cache_dir)) / "bases")


def plan_jobs(config: DictConfig, config_loader: Any, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int) -> list[PlannedJob]:
    """Every job of the batch planned (see the module docstring), in the sweep's order, with ``after`` set."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    jobs: list[PlannedJob] = []
    try:
        for i, overrides in enumerate(job_overrides):
            job = PlannedJob(initial_job_idx + i, list(overrides))
            try:
                _plan_one(job, config, config_loader)
            except Exception as exc:  # noqa: BLE001 - the job itself will fail and record why
                job.action, job.role, job.problem = RUN, FREE, f"{type(exc).__name__}: {exc}"
                log.debug("could not plan job %d: %s", job.idx, job.problem)
            jobs.append(job)
    finally:
        HydraConfig.instance().cfg = saved
    link_bases(jobs)
    return jobs


def link_bases(jobs: list[PlannedJob]) -> None:
    """Set ``after``: the jobs of one base follow the job that fills it."""
    groups: dict[str, list[PlannedJob]] = {}
    for j in jobs:
        if j.action == RUN and j.base_key:
            groups.setdefault(j.base_key, []).append(j)
    for key, group in groups.items():
        bases = [j for j in group if j.role == BASE]
        if bases:
            head = bases[0]
        else:
            if _cached(group[0]):
                continue
            head = group[0]
        for j in group:
            if j is not head:
                j.after = head.idx


def _cached(job: PlannedJob) -> bool:
    try:
        from subgroup_robustness.models.base_cache import BaseCache

        return BaseCache(job.cache_root).has(job.base_key)
    except Exception:  # noqa: BLE001
        return False


def waves(jobs: list[PlannedJob]) -> list[list[PlannedJob]]:
    """The jobs to run: the base fine-tunes other jobs follow, then all the others. Jobs that need no base
    (QAT, vocabulary transfer from the pretrained model) wait with the followers: in the first wave a
    parallel launcher would wait for the slowest of them before any follower could start (one-seed
    offline grid: the base plus 6 such jobs, QAT the longest, with one core idle at the end of the wave)."""
    to_run = [j for j in jobs if j.action == RUN]
    heads = {j.after for j in to_run if j.after is not None}
    first = [j for j in to_run if j.idx in heads]
    return [w for w in (first, [j for j in to_run if j.idx not in heads]) if w]


def plan_text(jobs: list[PlannedJob]) -> str:
    n = len(jobs)
    skip = sum(j.action == SKIP for j in jobs)
    away = sum(j.action == ELSEWHERE for j in jobs)
    run = [j for j in jobs if j.action == RUN]
    heads = {j.after for j in run if j.after is not None}
    text = f"{n} jobs: {len(run)} to run"
    if skip:
        text += f", {skip} complete (skipped, not launched)"
    if away:
        text += f", {away} live elsewhere (not launched)"
    if heads:
        followers = len(run) - len(heads)  # the followers and the jobs that need no base (see waves)
        text += f"; {len(heads)} base fine-tune{'s' if len(heads) > 1 else ''} first, {followers} job{'s' if followers > 1 else ''} after {'them' if len(heads) > 1 else 'it'}"
    return text


# ---- progress for jobs the launcher settles itself ------------------------------------------------------
def _progress_folder(config: DictConfig) -> Path:
    from subgroup_robustness.sweep import progress_folder

    return progress_folder(config.hydra.sweep.dir)


def record_unlaunched(config: DictConfig, jobs: list[PlannedJob]) -> None:
    """State files for the jobs not launched (complete, live elsewhere), so the counts and summary see them."""
    from subgroup_robustness.sweep import record_state

    folder = _progress_folder(config)
    for j in jobs:
        if j.action == SKIP:
            record_state(folder, j.idx, j.label, j.out_dir, "skipped", None, planned=True)
        elif j.action == ELSEWHERE:
            record_state(folder, j.idx, j.label, j.out_dir, "elsewhere", j.reason, planned=True)


def job_return(job: PlannedJob, value: float = math.nan) -> Any:
    """A completed JobReturn for a job this launcher settled (the sweepers read every return's value)."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn()
    ret.overrides = list(job.overrides)
    ret.return_value = value
    ret.status = JobStatus.COMPLETED
    return ret


def check_locks(config: DictConfig, cluster: bool) -> str | None:
    """At start-up: what locking the base cache's filesystem offers (utils.locks.check_lock_coherent).
    Returns a line to print when it is not sound everywhere the jobs run, else None."""
    from subgroup_robustness.utils.locks import check_lock_coherent

    cache = OmegaConf.select(config, "paths.cache_dir", default=None)
    if not cache:
        return None
    try:
        res = check_lock_coherent(Path(str(cache)))
    except OSError as exc:
        return f"the base cache {cache} is not writable here: {exc}"
    if not res.ok or res.flock != "exclusive":
        return res.message
    if cluster and res.cross_node in (False, None):
        return (f"{res.message}. The job graph runs each base fine-tune before the jobs that use it, so only a "
                f"base outside the grid could be built twice (by two nodes at once; both copies are valid). "
                f"See docs/cluster.md (paths.cache_dir on a coherent filesystem)")
    return None


def _console_line(text: str) -> None:
    from rich.markup import escape

    from subgroup_robustness.utils.console import console

    console.print(f"[bold cyan]\\[sweep][/bold cyan] {escape(text)}", soft_wrap=True)


def drop_progress_bar(sweep_config: DictConfig) -> None:
    """Parallel or batch jobs: no per-job progress bar (two workers' bars overwrite each other; a bar in a
    SLURM log file is noise). Set on the composed config, so job folders and identities are unchanged."""
    if OmegaConf.select(sweep_config, "callbacks.progress", default=None) is not None:
        with open_dict(sweep_config):
            sweep_config.callbacks.progress = None


# ---- basic (one process, one job after the other) ------------------------------------------------------
def launch_basic(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    from hydra.core.utils import configure_log, filter_overrides, run_job, setup_globals

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(config, launcher.hydra_context.config_loader, job_overrides, initial_job_idx)
    _announce(config, jobs, cluster=False)
    record_unlaunched(config, jobs)
    returns: dict[int, Any] = {j.idx: job_return(j, j.value) for j in jobs if j.action != RUN}
    for wave in waves(jobs):
        for j in wave:
            log.info(f"\t#{j.idx} : {' '.join(filter_overrides(j.overrides))}")
            sweep_config = launcher.hydra_context.config_loader.load_sweep_config(config, list(j.overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = j.idx
                sweep_config.hydra.job.num = j.idx
            returns[j.idx] = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                                     config=sweep_config, job_dir_key="hydra.sweep.dir",
                                     job_subdir_key="hydra.sweep.subdir")
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [returns[j.idx] for j in jobs]


def _announce(config: DictConfig, jobs: list[PlannedJob], cluster: bool) -> None:
    quiet = "sweep_progress" not in (OmegaConf.select(config, "hydra.callbacks", default=None) or {})
    if not quiet:
        _console_line(f"plan: {plan_text(jobs)}")
    problem = check_locks(config, cluster)
    if problem:
        _console_line(f"locking: {problem}")


# ---- joblib (worker processes on this machine) -----------------------------------------------------------
def execute_joblib_job(idx: int, overrides: Sequence[str], hydra_context: Any, config: DictConfig,
                       task_function: Any, singleton_state: dict[Any, Any], progress_bar: bool,
                       threads: int | None = None) -> Any:
    """hydra_joblib_launcher's execute_job, without the per-job progress bar when asked; ``threads``: the
    job's torch threads (its share of the physical cores; loky's own cap counts logical CPUs)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    if threads:
        os.environ["SR_NUM_THREADS"] = str(threads)  # read by utils.perf.configure_threads when the job starts
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    if not progress_bar:
        drop_progress_bar(sweep_config)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def launch_joblib(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, setup_globals
    from joblib import Parallel, delayed, effective_n_jobs

    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg

    from subgroup_robustness.utils.perf import physical_cores

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(config, launcher.hydra_context.config_loader, job_overrides, initial_job_idx)
    _announce(config, jobs, cluster=False)
    record_unlaunched(config, jobs)
    joblib_cfg = dict(launcher.joblib)
    progress_bar = joblib_cfg.pop("progress_bar", None)
    joblib_cfg["backend"] = "loky"
    process_joblib_cfg(joblib_cfg)
    n_jobs = effective_n_jobs(joblib_cfg.get("n_jobs", -1))
    returns: dict[int, Any] = {j.idx: job_return(j, j.value) for j in jobs if j.action != RUN}
    state = Singleton.get_state()
    for wave in waves(jobs):
        # no more workers than jobs: a wave of one job (the single base fine-tune of a one-seed grid) runs in
        # this process with every core, where a loky worker would get cores // n_jobs threads and idle the rest
        width = min(n_jobs, len(wave))
        bar = progress_bar if progress_bar is not None else width == 1
        # side by side, each job gets its share of the physical cores (a user's SR_NUM_THREADS wins)
        threads = None if width == 1 or os.environ.get("SR_NUM_THREADS") else max(1, physical_cores() // width)
        runs = Parallel(**{**joblib_cfg, "n_jobs": width})(
            delayed(execute_joblib_job)(j.idx, j.overrides, launcher.hydra_context, config,
                                        launcher.task_function, state, bar, threads) for j in wave)
        for j, r in zip(wave, runs):
            returns[j.idx] = r
    return [returns[j.idx] for j in jobs]


# ---- SLURM ----------------------------------------------------------------------------------------------
def normal_state(state: str | None) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; empty -> ``UNKNOWN``."""
    return (state or "UNKNOWN").split()[0].rstrip("+").upper() or "UNKNOWN"


_STEP_END = re.compile(r"\*\*\* (?:JOB|STEP) (\S+) ON (\S+) CANCELLED AT (\S+)(?: DUE TO ([A-Z ]+?))? \*\*\*")


def slurm_details(job_id: str) -> dict[str, str]:
    """sacct's view of one job (state, exit code, elapsed, node), best effort: {} when sacct cannot say."""
    fields = "JobID,State,ExitCode,Elapsed,Timelimit,NodeList,Reason"
    try:
        out = subprocess.run(["sacct", "-X", "-P", "-o", fields, "-j", str(job_id)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    names = lines[0].split("|")
    for line in lines[1:]:
        row = dict(zip(names, line.split("|")))
        if row.get("JobID") == str(job_id):
            return {k: v for k, v in row.items() if v}
    return {}


def scontrol_restarts(job_id: str) -> int | None:
    """How many times SLURM requeued the job (scontrol's Restarts=; known for MinJobAge after it ends)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bRestarts=(\d+)", out)
    return int(m.group(1)) if m else None


def slurm_reason(state: str, raw_state: str, stderr: str, params: dict[str, Any], details: dict[str, str]) -> str:
    """One sentence: why SLURM ended the job, from its state, sacct and the job's error stream."""
    found = _STEP_END.findall(stderr or "")
    when = found[-1][2] if found else ""
    due = found[-1][3].strip() if found and found[-1][3] else ""
    by = re.search(r"by (\d+)", raw_state or "")
    timeout_min = params.get("timeout_min")
    mem = params.get("mem_gb")
    oom = "oom_kill" in (stderr or "") or "Out Of Memory" in (stderr or "") or state == "OUT_OF_MEMORY"
    if oom:
        text = f"out of memory: the job used more than its {mem} GB (hydra.launcher.mem_gb)" if mem else "out of memory"
    elif state == "TIMEOUT" or due == "TIME LIMIT":
        text = (f"time limit reached ({timeout_min} min, hydra.launcher.timeout_min)" if timeout_min
                else "time limit reached")
    elif state == "PREEMPTED" or due == "PREEMPTION":
        text = "preempted by a higher-priority job"
    elif state == "NODE_FAIL" or due == "NODE FAILURE":
        text = "its node failed"
    elif state == "CANCELLED":
        text = "cancelled (scancel" + (f" by uid {by.group(1)}" if by else "") + ")"
    elif state == "BOOT_FAIL":
        text = "its node failed to boot"
    elif state == "DEADLINE":
        text = "its deadline passed"
    elif state == "LOST":
        text = "SLURM no longer knows the job (not in sacct/squeue)"
    elif state == "FAILED":
        text = f"the job's process failed outside the run (exit code {details.get('ExitCode', '?')})"
    else:
        text = f"ended in state {state} without a result"
    extra = []
    if when:
        extra.append(f"at {when}")
    if details.get("NodeList") and details["NodeList"] not in ("None", "None assigned"):
        extra.append(f"on {details['NodeList']}")
    if details.get("Elapsed"):
        extra.append(f"after {details['Elapsed']}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def record_slurm_end(job: PlannedJob, info: dict[str, Any]) -> str:
    """Write SLURM's end of ``job`` into its results.json (unless a completed result is there: a job can
    finish just before SLURM ends it) and return the error line for the progress file."""
    from subgroup_robustness.results import RESULTS_FILE, base_record, read_record, write_results

    line = f"SLURM {info['state']}: {info['reason']}"
    if not job.out_dir:
        return line
    path = Path(job.out_dir) / RESULTS_FILE
    rec, _ = read_record(path)
    if rec and rec.get("status") == "completed":
        return line
    if rec is None:
        rec = base_record(job.run_id, job.summary, {})
        rec["output_dir"] = job.out_dir
        rec["started"] = None
    job_error = rec.get("error")
    note = None
    if job_error and str(job_error.get("type", "")).startswith("SLURM"):  # the job's own note of a signal
        note, job_error = job_error.get("message"), job_error.get("job_error")
    rec["status"] = "failed"
    rec["error"] = {"type": f"SLURM {info['state']}", "message": info["reason"], "traceback": "",
                    **({"note": note} if note else {}), **({"job_error": job_error} if job_error else {})}
    rec["slurm"] = info
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        write_results(path, rec)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
    return line


class SlurmJobs:
    """The submitting side of the SLURM launcher: submit the plan, wait, settle every job."""

    def __init__(self, launcher: Any, jobs: list[PlannedJob]):
        self.launcher, self.jobs = launcher, jobs
        self.config = launcher.config
        self.submitted: dict[int, Any] = {}       # idx -> submitit job
        self.outcomes: dict[int, Any] = {}        # idx -> JobReturn
        self.unknown_since: dict[int, float] = {}
        self.quiet = "sweep_progress" not in (OmegaConf.select(self.config, "hydra.callbacks", default=None) or {})

    # -- submission ----------------------------------------------------------------------------------------
    def executor(self) -> Any:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        la = self.launcher
        params = dict(la.params)
        folder = params.pop("submitit_folder")
        params.pop("max_num_timeout", None)
        params.pop("array_parallelism", None)
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=la.max_requeue)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def submit(self) -> None:
        from hydra.core.singleton import Singleton

        la = self.launcher
        executor = self.executor()
        extra = dict(la.params.get("additional_parameters") or {})
        user_dep = extra.pop("dependency", None)
        lanes = int(la.params.get("array_parallelism") or 0)
        order = [j for w in waves(self.jobs) for j in w]
        state = Singleton.get_state()
        for k, j in enumerate(order):
            deps = []
            if j.after is not None and j.after in self.submitted:
                deps.append(str(self.submitted[j.after].job_id))
            if lanes and k >= lanes:
                deps.append(str(self.submitted[order[k - lanes].idx].job_id))
            dep = ":".join(dict.fromkeys(deps))
            dependency = ",".join(x for x in (f"afterany:{dep}" if dep else "", user_dep or "") if x)
            executor.update_parameters(name=j.name, slurm_additional_parameters=dict(
                extra, **({"dependency": dependency} if dependency else {})))
            self.submitted[j.idx] = executor.submit(la, list(j.overrides), "hydra.sweep.dir", j.idx,
                                                    f"job_id_for_{j.idx}", state)
            log.info("#%d %s -> SLURM job %s%s", j.idx, j.name, self.submitted[j.idx].job_id,
                     f" (after {dependency})" if dependency else "")
        if order and not self.quiet:
            first, last = self.submitted[order[0].idx].job_id, self.submitted[order[-1].idx].job_id
            _console_line(f"submitted {len(order)} SLURM jobs ({first}..{last}); logs in "
                          f"{Path(str(la.params['submitit_folder'])).parent}; this command waits for them "
                          f"(Ctrl-C stops waiting, not the jobs)")

    # -- waiting -------------------------------------------------------------------------------------------
    def wait(self) -> None:
        from subgroup_robustness.sweep import counts_text, eta_seconds, progress_folder, tally

        if not self.submitted:
            return
        watcher = next(iter(self.submitted.values())).watcher
        poll = max(1.0, float(self.launcher.poll_s))
        folder = progress_folder(self.config.hydra.sweep.dir)
        last_text, last_print = None, 0.0
        pending = dict(self.submitted)
        while pending:
            watcher.update()  # one sacct call for every job
            states = {}
            for idx, sj in list(pending.items()):
                raw = watcher.get_info(sj.job_id, mode="cache").get("State")
                state = normal_state(raw)
                states[idx] = state
                if state == "UNKNOWN":
                    since = self.unknown_since.setdefault(idx, time.time())
                    if time.time() - since > max(900.0, 30 * poll) and not self._in_squeue(sj.job_id):
                        state, raw = "LOST", "LOST"
                else:
                    self.unknown_since.pop(idx, None)
                if sj.paths.result_pickle.exists() or state in TERMINAL:
                    self.outcomes[idx] = self.settle(self._job(idx), sj, state, raw or state)
                    del pending[idx]
            t = tally(folder)
            running = sum(1 for i, s in states.items() if i in pending and s in ("RUNNING", "COMPLETING"))
            c = dict(t["counts"], running=running)
            durations = [j["seconds"] for j in t["jobs"] if j.get("state") == "done" and j.get("seconds")]
            eta = eta_seconds(c, t["total"], durations, parallel=max(1, running))
            text = counts_text(c, t["total"], eta, pending=len(pending) - running)
            if not self.quiet and (text != last_text or time.time() - last_print > 600):
                _console_line(text)
                last_text, last_print = text, time.time()
            if pending:
                time.sleep(poll)

    def _job(self, idx: int) -> PlannedJob:
        return next(j for j in self.jobs if j.idx == idx)

    @staticmethod
    def _in_squeue(job_id: str) -> bool:
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: keep waiting
        return bool(out.strip())

    def _wait_gone(self, job_id: str, limit: float = 120.0) -> None:
        """Until the job's processes are gone (a cancelled job is COMPLETING for KillWait seconds), so its
        own last write to results.json lands before this one."""
        end = time.time() + limit
        while time.time() < end and self._in_squeue(job_id):
            time.sleep(1.0)

    def settle(self, job: PlannedJob, sj: Any, state: str, raw_state: str) -> Any:
        from subgroup_robustness.sweep import record_state

        folder = _progress_folder(self.config)
        if sj.paths.result_pickle.exists():
            try:
                ret = sj.result()
            except Exception as exc:  # noqa: BLE001 - an exception escaped the job: its record says more
                text = str(exc).strip().splitlines()
                info = {"job_id": str(sj.job_id), "state": "FAILED", "raw_state": raw_state,
                        "reason": f"the job raised outside the run: {text[-1][:300] if text else type(exc).__name__}"}
                self._settle_failed(job, info, folder)
                return job_return(job)
            from hydra.core.utils import JobStatus

            if getattr(ret, "status", None) == JobStatus.FAILED:  # the task raised: keep the sweep going
                return job_return(job)
            return ret
        self._wait_gone(sj.job_id)
        details = slurm_details(sj.job_id)
        if details.get("State"):
            raw_state = details["State"]
            state = normal_state(raw_state)
        try:
            stderr = sj.stderr() or ""
        except Exception:  # noqa: BLE001
            stderr = ""
        info = {"job_id": str(sj.job_id), "state": state, "raw_state": raw_state,
                "reason": slurm_reason(state, raw_state, stderr, self.launcher.params, details),
                "exit_code": details.get("ExitCode"), "elapsed": details.get("Elapsed"),
                "node": details.get("NodeList"), "restarts": scontrol_restarts(sj.job_id),
                "log": str(sj.paths.stderr)}
        self._settle_failed(job, info, folder)
        return job_return(job)

    def _settle_failed(self, job: PlannedJob, info: dict[str, Any], folder: Path) -> None:
        from subgroup_robustness.sweep import record_state

        line = record_slurm_end(job, info)
        record_state(folder, job.idx, job.label, job.out_dir, "failed", line,
                     slurm={k: v for k, v in info.items() if v is not None})
        if not self.quiet:
            _console_line(f"FAILED {job.label} (SLURM job {info['job_id']}): {line}")


def launch_slurm(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    from subgroup_robustness.sweep import SUMMARY_FILE, progress_folder, write_summary

    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    jobs = plan_jobs(config, launcher.hydra_context.config_loader, job_overrides, initial_job_idx)
    _announce(config, jobs, cluster=True)
    record_unlaunched(config, jobs)
    # what the jobs need from this launch (pickled with the launcher)
    from subgroup_robustness.sweep import PROGRESS_ENV

    launcher._job_env = {PROGRESS_ENV: str(progress_folder(sweep_dir))}
    slurm = SlurmJobs(launcher, jobs)
    finished = False
    try:
        slurm.submit()
        slurm.wait()
        finished = True
    except KeyboardInterrupt:
        ids = " ".join(str(sj.job_id) for sj in slurm.submitted.values())
        _console_line("stopped waiting; the submitted jobs keep running in SLURM (squeue --me; "
                      f"scancel {ids} stops them). Relaunch the same command to collect them: finished jobs "
                      "are skipped, running ones are left to their owner")
        raise
    finally:
        if not finished:  # Hydra skips on_multirun_end when the launch raises: the summary is written here
            write_summary(sweep_dir, progress_folder(sweep_dir), state="interrupted")
            log.info("wrote %s", sweep_dir / SUMMARY_FILE)
    returns = {j.idx: job_return(j, j.value) for j in jobs if j.action != RUN}
    returns.update(slurm.outcomes)
    return [returns.get(j.idx) or job_return(j) for j in jobs]


# ---- the SLURM job's side -----------------------------------------------------------------------------
def run_slurm_job(launcher: Any, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                  singleton_state: dict[Any, Any], attempt: int) -> Any:
    """In the SLURM job: hydra-submitit's job body, plus this launch's environment, the attempt number,
    no progress bar, a note of the pre-timeout/preemption signal, and the requeue record."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    os.environ.update(getattr(launcher, "_job_env", {}) or {})
    os.environ[ATTEMPT_ENV] = str(attempt)
    if attempt:
        os.environ[RESUME_ENV] = "1"
    launcher._attempt, launcher._requeue, launcher._signals = attempt, None, []
    launcher._t0 = time.time()
    _watch_usr_signal(launcher)
    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, sweep_overrides)
    with open_dict(sweep_config.hydra.job) as job:
        job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num
    if not launcher.progress_bar:
        drop_progress_bar(sweep_config)
    try:
        ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                      config=sweep_config, job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
    except BaseException:
        _after_slurm_job(launcher, sweep_config)
        raise
    _after_slurm_job(launcher, sweep_config)
    return ret


def _watch_usr_signal(launcher: Any) -> None:
    """Wrap submitit's USR2 handler (checkpoint and requeue): note the signal (no I/O in a handler: a
    write to a stream the main thread is writing raises "reentrant call"), and requeue only within the bound;
    past it, let the job run on (it may finish before the limit; SLURM stops it otherwise)."""
    from submitit.core.job_environment import JobEnvironment

    try:
        signum = JobEnvironment._usr_sig()
    except Exception:  # noqa: BLE001
        return
    original = signal.getsignal(signum)

    def handler(sig, frame):
        launcher._signals.append({"signal": signal.Signals(sig).name, "at": time.time()})
        if launcher._attempt < launcher.max_requeue and callable(original):
            original(sig, frame)

    try:
        signal.signal(signum, handler)
    except ValueError:  # not the main thread
        pass


def _after_slurm_job(launcher: Any, sweep_config: DictConfig) -> None:
    """The record of a job that was requeued, or signalled past its requeue bound."""
    from subgroup_robustness.results import RESULTS_FILE, read_record, write_results
    from subgroup_robustness.sweep import record_state

    if not launcher._requeue and not launcher._signals:
        return
    try:
        out = Path(str(sweep_config.hydra.runtime.output_dir))
    except Exception:  # noqa: BLE001 - the job never got its folder
        return
    path = out / RESULTS_FILE
    rec, _ = read_record(path)
    if rec is None or rec.get("status") == "completed":
        return
    timeout_min = launcher.params.get("timeout_min")
    if launcher._requeue:
        r = launcher._requeue
        rec["status"] = "requeued"
        rec["error"] = {"type": "SLURM REQUEUED", "message": (
            f"{r['why']}: requeued (requeue {r['attempt']} of at most {launcher.max_requeue}); the requeued "
            f"job resumes in this folder"), "traceback": "",
            **({"job_error": rec["error"]} if rec.get("error") else {})}
        rec.setdefault("slurm", {})["requeues"] = r["attempt"]
        write_results(path, rec)
        return
    if rec.get("status") in ("failed", "terminated", "interrupted"):
        why = ("time limit near" if launcher._timed_out() else "preempted")
        rec["error"] = {"type": "SLURM " + ("TIMEOUT" if why == "time limit near" else "PREEMPTED"),
                        "message": f"{why} (signal {launcher._signals[-1]['signal']}, {timeout_min} min limit); "
                                   f"not requeued: max_requeue={launcher.max_requeue} reached",
                        "traceback": "", **({"job_error": rec["error"]} if rec.get("error") else {})}
        rec["status"] = "failed"
        write_results(path, rec)
        try:
            record_state(_progress_folder(sweep_config), int(sweep_config.hydra.job.num),
                         os.path.relpath(str(out), os.path.abspath(str(sweep_config.hydra.sweep.dir))), str(out),
                         "failed", f"{rec['error']['type']}: {rec['error']['message']}")
        except Exception:  # noqa: BLE001
            pass


class SlurmLauncherBase:
    """Mixed into hydra-submitit's BaseSubmititLauncher by the registered plugin class."""

    OWN_KEYS = ("max_requeue", "poll_s", "progress_bar")

    def _init_own(self, params: dict[str, Any]) -> dict[str, Any]:
        own = {k: params.pop(k) for k in list(params) if k in self.OWN_KEYS}
        self.max_requeue = max(0, int(own.get("max_requeue", 0) or 0))
        self.poll_s = float(own.get("poll_s", 30) or 30)
        self.progress_bar = bool(own.get("progress_bar", False))
        self._job_env: dict[str, str] = {}
        self._attempt, self._requeue, self._signals, self._t0 = 0, None, [], time.time()
        return params

    def _timed_out(self) -> bool:
        """As submitit decides it: past min(80 %, limit - 10 min) of the time limit."""
        limit = float(self.params.get("timeout_min") or 0) * 60
        ran = time.time() - self._t0
        return bool(limit) and ran >= min(0.8 * limit, limit - 600)

    def checkpoint(self, *args: Any, attempt: int = 0, **kwargs: Any) -> Any:
        """Called by submitit on the USR2 signal: requeue (the same job, attempt + 1) within the bound."""
        import submitit

        if attempt >= self.max_requeue:
            return None
        self._requeue = {"attempt": attempt + 1,
                         "why": "time limit near" if self._timed_out() else "preempted"}
        return submitit.helpers.DelayedSubmission(self, *args, attempt=attempt + 1, **kwargs)
