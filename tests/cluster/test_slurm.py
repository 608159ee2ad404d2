"""The grid on a real SLURM cluster (hydra/launcher=slurm_cpu): end to end as a job graph, and what SLURM
does to jobs every day -- scancel, a time limit (with one requeue), a relaunch while the first launch still
runs, a job killed while it saves its result. Each failure must leave a correct results.json (SLURM's state
and reason) and a sweep summary, and the sweep must go on.

Run by ``make test-cluster`` (tests/cluster/cluster.sh), skipped otherwise (see conftest.py). Tiny jobs: a
2-layer BERT on the RedditBias fixture, one CPU and 1 GB each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.cluster

HOOKS = Path(__file__).parent / "hooks"
SWEEP = Path("logs") / "offline_grid" / "multirun"


def slurm_args(tiny_model_dir, redditbias_root, *extra: str) -> list[str]:
    part = os.environ.get("SR_CLUSTER_PARTITION")
    return ["--multirun", "experiment=offline_grid", "model=local", f"model.path={tiny_model_dir}",
            f"dataset.source.root={redditbias_root}", "trainer.max_epochs=1", "trainer.precision=32-true",
            "logger=none", "print_config=false", "hydra/launcher=slurm_cpu",
            *([f"hydra.launcher.partition={part}"] if part else []),
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
            "hydra.launcher.poll_s=2", *extra]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def launch(args: list[str], cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "subgroup_robustness", *args], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def start(args: list[str], cwd: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "subgroup_robustness", *args], cwd=cwd, env=env(**extra_env),
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the sweep this test started
        proc.wait()
        pytest.fail(f"the sweep did not finish in {timeout} s:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def results(sweep: Path) -> dict[str, dict]:
    out = {}
    for p in sweep.rglob("results.json"):
        try:
            out[str(p.parent.relative_to(sweep))] = json.loads(p.read_text())
        except ValueError:
            out[str(p.parent.relative_to(sweep))] = {"status": "<corrupt>"}
    return out


def summary(sweep: Path) -> dict:
    return json.loads((sweep / "sweep_summary.json").read_text())


def job_record(sweep: Path, part: str, timeout: float = 300, status: str | None = "running") -> tuple[Path, dict]:
    """Wait for the job whose folder name contains ``part`` to have a results.json (of ``status``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in sweep.rglob("results.json") if sweep.exists() else []:
            if part in p.parent.name:
                try:
                    rec = json.loads(p.read_text())
                except ValueError:
                    continue
                if status is None or rec.get("status") == status:
                    return p.parent, rec
        time.sleep(0.5)
    pytest.fail(f"no job folder with {part!r} reached status {status!r} in {timeout} s")


def slurm_id_of(sweep: Path, folder: Path, timeout: float = 120) -> str:
    """The SLURM job id of the job running in ``folder`` (from its progress file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for f in (sweep / ".progress").rglob("job-*.json"):
            info = json.loads(f.read_text())
            if Path(info.get("dir", "")) == folder.resolve() and info.get("slurm_job_id"):
                return str(info["slurm_job_id"])
        time.sleep(0.5)
    pytest.fail(f"no SLURM job id recorded for {folder}")


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def sacct(*ids: str) -> list[dict[str, str]]:
    fields = "JobID,JobName,State,Start,End"
    out = subprocess.run(["sacct", "-X", "-P", "-o", fields, *[a for i in ids for a in ("-j", i)]],
                         capture_output=True, text=True, timeout=30).stdout.splitlines()
    return [dict(zip(fields.split(","), line.split("|"))) for line in out[1:] if line]


def submitted_ids(sweep: Path) -> set[str]:
    folder = sweep / ".submitit"  # one folder per SLURM job, named by its id
    return {p.name for p in folder.iterdir() if p.is_dir() and p.name[0].isdigit()} if folder.exists() else set()


def wait_sacct(ids: set[str], timeout: float = 60) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    rows: list[dict[str, str]] = []
    while time.time() < deadline:
        rows = sacct(*ids)
        if len(rows) >= len(ids) and all(r["End"] not in ("", "Unknown") for r in rows):
            return rows
        time.sleep(1)
    return rows


# ---- the grid, end to end ---------------------------------------------------------------------------------
def test_grid_runs_as_a_job_graph_and_a_relaunch_queues_nothing(tiny_model_dir, redditbias_root, sr_env):
    args = slurm_args(tiny_model_dir, redditbias_root, "setting=base,dq,pr40", "seed=1",
                      "hydra.launcher.setup=[echo sr-setup-ran]")
    proc = launch(args, sr_env)
    sweep = sr_env / SWEEP
    recs = results(sweep)
    assert len(recs) == 3 and {r["status"] for r in recs.values()} == {"completed"}, recs
    s = summary(sweep)
    assert (s["state"], s["done"], s["failed"]) == ("finished", 3, 0)
    assert "1 base fine-tune first, 2 jobs after it" in proc.stdout
    assert "finished · done 3" in proc.stdout  # the submitting terminal's grid progress line

    ids = submitted_ids(sweep)
    rows = {r["JobName"]: r for r in wait_sacct(ids)}
    assert set(rows) == {"redditbias-base-s1", "redditbias-dq-s1", "redditbias-pr40-s1"}, rows
    base_end = rows["redditbias-base-s1"]["End"]
    assert all(rows[n]["Start"] >= base_end for n in ("redditbias-dq-s1", "redditbias-pr40-s1")), rows
    reused = [r["base"]["reused"] for r in recs.values() if r["run"]["compressor"] != "none"]
    assert reused == [True, True]  # the base was fine-tuned once, before the jobs that start from it
    logs = " ".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("sr-setup-ran") == 3  # the setup lines run in every job

    again = launch(args, sr_env)
    assert "3 complete (skipped, not launched)" in again.stdout
    assert submitted_ids(sweep) == ids  # nothing queued
    s = summary(sweep)
    assert (s["skipped"], s["done"], s["failed"]) == (3, 0, 0)


# ---- scancel ------------------------------------------------------------------------------------------
def test_a_cancelled_job_is_recorded_and_the_sweep_goes_on(tiny_model_dir, redditbias_root, sr_env):
    """Two jobs; the long one (400 epochs, no early stopping) is cancelled while it trains."""
    args = slurm_args(tiny_model_dir, redditbias_root, "setting=base", "seed=1", "trainer.max_epochs=1,400",
                      "callbacks.early_stopping=null")
    log = sr_env / "sweep.log"
    proc = start(args, sr_env, log)
    sweep = sr_env / SWEEP
    try:
        folder, _ = job_record(sweep, "max_epochs=400")
        job_id = slurm_id_of(sweep, folder)
        time.sleep(2)
        subprocess.run(["scancel", job_id], check=True, timeout=30)
    finally:
        out = finish(proc, log)
    rec = json.loads((folder / "results.json").read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] == "SLURM CANCELLED", rec.get("error")
    assert "cancelled (scancel" in rec["error"]["message"] and rec["slurm"]["job_id"] == job_id
    done = [r for k, r in results(sweep).items() if "max_epochs=400" not in k]
    assert [r["status"] for r in done] == ["completed"]  # the other job ran to its end
    s = summary(sweep)
    assert (s["state"], s["done"], s["failed"]) == ("finished", 1, 1)
    assert "SLURM CANCELLED" in s["failed_jobs"][0]["error"]
    assert "FAILED" in out and "SLURM CANCELLED" in out


# ---- time limit, requeued once ------------------------------------------------------------------------
def test_a_job_past_its_time_limit_is_requeued_once_then_recorded(tiny_model_dir, redditbias_root, sr_env):
    """A job that never ends, 1 minute allowed, one requeue: SLURM's USR2 (30 s before the limit) requeues
    it into the same folder (attempt 1); the second time the bound is reached, so it runs until SLURM stops
    it at the limit; the record says TIMEOUT, the requeue is counted, the summary is written.

    SLURM may send ``--signal`` up to 60 s early ("due to the resolution of event handling", sbatch(1)): with a
    1-minute limit the first USR2 can come seconds after the start, before the job has written any record
    (2026-12-08: 2 s in, on a slow machine), and a requeue with no record yet leaves none. So the requeue is
    read from SLURM (Restarts=), and the "requeued" record is checked only where the job had written one."""
    from subgroup_robustness.launchers import scontrol_restarts

    args = slurm_args(tiny_model_dir, redditbias_root, "setting=base", "seed=1", "trainer.max_epochs=100000",
                      "callbacks.early_stopping=null", "hydra.launcher.timeout_min=1",
                      "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_requeue=1")
    log = sr_env / "sweep.log"
    proc = start(args, sr_env, log)
    sweep = sr_env / SWEEP
    try:
        deadline = time.time() + 300
        while not submitted_ids(sweep):
            assert time.time() < deadline, "no SLURM job was submitted"
            time.sleep(0.5)
        job_id, = submitted_ids(sweep)
        # SLURM holds a requeued job for ~2 minutes (BeginTime) before it may start again: release it now
        while not (scontrol_restarts(job_id) == 1 and squeue_state(job_id) == "PENDING"):
            assert time.time() < deadline, f"job {job_id} was not requeued"
            time.sleep(0.5)
        records = [rec for name, rec in results(sweep).items() if "max_epochs=100000" in name]
        if records and records[0].get("status") == "requeued":
            assert "requeued (requeue 1 of at most 1)" in records[0]["error"]["message"], records[0]["error"]
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30, check=True)
    finally:
        out = finish(proc, log, timeout=900)
    (folder, rec), = results(sweep).items()
    assert rec["status"] == "failed" and rec["error"]["type"] == "SLURM TIMEOUT", rec.get("error")
    assert "time limit reached (1 min" in rec["error"]["message"]
    assert rec["slurm"]["restarts"] == 1, rec["slurm"]  # requeued once, not more
    # submitit logs "Starting with JobEnvironment" when each attempt starts, into the one log file that SLURM
    # appends to (same job id). Its "Requeued job" line is not counted: submitit writes it after
    # `scontrol requeue` returns, and SLURM's kill often wins that race (CI, stop 20: the line was missing).
    lines = [ln for p in (sweep / ".submitit").rglob("*_log.*") for ln in p.read_text().splitlines()
             if ln.startswith("submitit")]
    starts = [ln for ln in lines if "Starting with" in ln]
    assert len(starts) == 2, lines  # the first attempt and one requeued attempt, no third
    assert sum("Requeued job" in ln for ln in lines) <= 1, lines
    s = summary(sweep)
    assert (s["state"], s["failed"]) == ("finished", 1) and "SLURM TIMEOUT" in s["failed_jobs"][0]["error"]
    assert "SLURM TIMEOUT" in out


# ---- relaunch while the first launch runs ----------------------------------------------------------------
def test_a_relaunch_while_the_first_runs_never_runs_a_job_twice(tiny_model_dir, redditbias_root, sr_env):
    args = slurm_args(tiny_model_dir, redditbias_root, "setting=base", "seed=1", "trainer.max_epochs=80",
                      "callbacks.early_stopping=null")
    log = sr_env / "first.log"
    first = start(args, sr_env, log)
    sweep = sr_env / SWEEP
    try:
        folder, running = job_record(sweep, "max_epochs=80")
        ids_before = submitted_ids(sweep)
        second = launch(args, sr_env)
        assert "1 live elsewhere (not launched)" in second.stdout, second.stdout[-3000:]
        assert submitted_ids(sweep) == ids_before  # nothing queued twice
        s = summary(sweep)
        assert s["elsewhere"] == 1 and "pid" in s["elsewhere_jobs"][0]["owner"]
    finally:
        finish(first, log)
    rec = json.loads((folder / "results.json").read_text())
    assert rec["status"] == "completed" and rec["started"] == running["started"]  # the one run, not a second
    assert len(sacct(*submitted_ids(sweep))) == 1


# ---- killed while saving -------------------------------------------------------------------------------
def test_a_job_killed_while_saving_leaves_no_corrupt_result(tiny_model_dir, redditbias_root, sr_env):
    """The job is cancelled (scancel: SIGTERM, SIGKILL KillWait seconds later) between writing its completed
    results.json's temporary file and renaming it into place: the folder holds the 'running' record (then
    SLURM's cancellation), never a partial file; the relaunch completes it."""
    args = slurm_args(tiny_model_dir, redditbias_root, "setting=base", "seed=1")
    log = sr_env / "sweep.log"
    hooks = {"PYTHONPATH": f"{HOOKS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             "SR_TEST_SLOW_SAVE": "results.json"}
    proc = start(args, sr_env, log, **hooks)
    sweep = sr_env / SWEEP
    try:
        folder, _ = job_record(sweep, "seed=1")
        deadline = time.time() + 300
        while not (folder / ".saving-results").exists():
            assert time.time() < deadline, "the job never reached its final save"
            time.sleep(0.2)
        tmp = list(folder.glob(".results.json.*.tmp"))
        assert tmp and b'"status": "completed"' in tmp[0].read_bytes()  # caught in the middle of saving
        subprocess.run(["scancel", slurm_id_of(sweep, folder)], check=True, timeout=30)  # TERM, then KILL after KillWait
    finally:
        finish(proc, log)
    rec = json.loads((folder / "results.json").read_text())  # valid JSON: never a torn file
    assert rec["status"] == "failed" and rec["error"]["type"] == "SLURM CANCELLED", rec.get("error")
    if (folder / "predictions.npz").exists():
        import numpy as np

        with np.load(folder / "predictions.npz") as z:
            assert len(z["pred"]) > 0
    assert summary(sweep)["failed"] == 1

    launch(args, sr_env)  # without the hook: finishes the job
    rec = json.loads((folder / "results.json").read_text())
    assert rec["status"] == "completed"
    assert summary(sweep)["done"] == 1
