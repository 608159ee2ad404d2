"""The grid: experiment configs, deterministic job folders, the launchers (basic_graph / local (joblib) /
submitit_local; the SLURM ones in tests/cluster) planning the sweep as a job graph (complete jobs not run,
jobs live elsewhere not started, bases first), skip-on-relaunch, kill-and-resume, failed jobs recorded
without stopping the sweep, SLURM outcome records and sweep summaries, the presets, the --help page, and
group metrics under two real (gloo) processes. W&B: tests/test_wandb.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import read_write

from tests.helpers import CONF, compose

PAPER_SETTINGS = ["base", "bert_medium", "bert_small", "bert_mini", "bert_tiny", "distilbert", "tinybert6",
                  "tinybert4", "pr20", "pr40", "pr60", "pr80", "dq", "sq", "qat", "vt100", "vt75", "vt50", "vt25"]
KD = {"bert_medium", "bert_small", "bert_mini", "bert_tiny", "distilbert", "tinybert6", "tinybert4"}


def sweep_params(name: str) -> dict[str, str]:
    cfg = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    return cfg["hydra"]["sweeper"]["params"]


# ---- configs ------------------------------------------------------------------------------------------
def test_paper_grid_is_the_papers_19_rows_on_three_datasets():
    params = sweep_params("paper")
    assert params["setting"].split(",") == PAPER_SETTINGS
    assert params["dataset"].split(",") == ["multinli", "civilcomments", "scotus"]
    assert params["seed"].split(",") == ["1", "2", "3", "4", "5"]
    for s in PAPER_SETTINGS:
        cfg = compose(["experiment=paper", f"setting={s}"])
        if s in KD:  # a distilled checkpoint, fine-tuned as is
            assert (cfg.model.name, cfg.compressor.name) == (s, "none"), s
        else:  # the reference model, compressed
            assert (cfg.model.name, cfg.compressor.name) == ("bert_base", "none" if s == "base" else s), s
        assert cfg.experiment_name == "paper"


def test_offline_grid_replaces_checkpoints_by_students_and_composes():
    settings = sweep_params("offline_grid")["setting"].split(",")
    assert not KD & set(settings) and {"distill", "distill_l2", "base"} <= set(settings)
    # every re-training row runs next to its matched-compute control (issue 12)
    assert {"refit", "vtc", "distill_ce", "distill_l2_ce"} <= set(settings)
    assert len(settings) >= 14
    for s in settings:
        cfg = compose(["experiment=offline_grid", f"setting={s}"])
        assert (cfg.model.name, cfg.compressor.name) == ("minilm_l6", "none" if s == "base" else s)
        assert cfg.dataset.name == "redditbias" and cfg.dataset.subsample.train == 2500
    smoke = compose(["experiment=smoke"])
    assert smoke.trainer.limit_train_batches == 2 and smoke.experiment_name == "smoke"
    assert smoke.hydra.sweeper.params.setting.split(",") == settings  # every setting, a few steps each


def test_job_count_and_deterministic_job_folders():
    from subgroup_robustness.sweep import count_jobs
    from subgroup_robustness.utils.resolvers import job_dirname

    assert count_jobs(compose(["experiment=paper"])) == 19 * 3 * 5
    assert count_jobs(compose(["experiment=paper", "dataset=scotus"])) == 19 * 5  # the command line wins
    cfg = compose(["experiment=offline_grid"])
    with read_write(cfg):
        cfg.hydra.overrides.task = ["experiment=offline_grid", "seed=1,2"]  # what --multirun passes on
    assert count_jobs(cfg) == 2 * len(sweep_params("offline_grid")["setting"].split(","))

    cfg = compose(["experiment=offline_grid", "setting=pr40", "seed=1"])
    assert job_dirname("seed=1,setting=pr40", _root_=cfg) == "seed=1,setting=pr40"
    long = compose(["experiment=offline_grid", "setting=pr40", "seed=1", "model=local", "model.path=/some/where/tiny"])
    name = job_dirname("model.path=/some/where/tiny,model=local,seed=1,setting=pr40", _root_=long)
    assert "/" not in name and name.startswith("model=local,seed=1,setting=pr40,h=")
    assert name == job_dirname("model.path=/some/where/tiny,model=local,seed=1,setting=pr40", _root_=long)
    other = job_dirname("model.path=/else/where/tiny,model=local,seed=1,setting=pr40", _root_=long)
    assert other != name  # a different model is a different job


# ---- running sweeps --------------------------------------------------------------------------------------
def grid_cli(tiny_model_dir, redditbias_root, *extra: str) -> list[str]:
    """The offline grid on the tiny model; the basic launcher unless ``extra`` names one (offline_grid's
    own default is hydra/launcher=local)."""
    launcher = [] if any(a.startswith("hydra/launcher=") for a in extra) else ["hydra/launcher=basic_graph"]
    return ["--multirun", "experiment=offline_grid", "model=local", f"model.path={tiny_model_dir}",
            f"dataset.source.root={redditbias_root}", "trainer.max_epochs=1", "trainer.precision=32-true",
            "logger=none", "print_config=false", "callbacks.progress=null", *launcher, *extra]


def launch(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    from tests.helpers import run_cli

    proc = run_cli(args, cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(sweep: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(sweep)): json.loads(p.read_text()) for p in sweep.rglob("results.json")}


def summary(sweep: Path) -> dict:
    return json.loads((sweep / "sweep_summary.json").read_text())


def test_joblib_grid_then_relaunch_skips_everything(tiny_model_dir, redditbias_root, sr_env):
    """3 settings x 2 seeds in 2 parallel joblib workers (hydra/launcher=local): the two base fine-tunes
    first, then the jobs that start from them; the report reads it; a relaunch redoes nothing."""
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base,dq,pr40", "seed=1,2",
                    "hydra/launcher=local", "hydra.launcher.n_jobs=2")
    proc = launch(args, sr_env)
    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    first = results(sweep)
    assert len(first) == 6 and all(r["status"] == "completed" for r in first.values())
    assert {(r["run"]["compressor"], r["run"]["seed"]) for r in first.values()} == \
        {(c, s) for c in ("none", "dq", "pr40") for s in (1, 2)}
    assert all(d.startswith("redditbias/model=local,seed=") and ",h=" in d for d in first)
    assert (summary(sweep)["done"], summary(sweep)["failed"]) == (6, 0)
    assert "[sweep" in proc.stdout and "done 6" in proc.stdout and "ETA" in proc.stdout
    assert "2 base fine-tunes first, 4 jobs after them" in proc.stdout
    bases_done = max(r["finished"] for r in first.values() if r["run"]["compressor"] == "none")
    assert all(r["started"] >= bases_done for r in first.values() if r["run"]["compressor"] != "none")
    assert all(r["base"]["reused"] for r in first.values() if r["run"]["compressor"] != "none")

    from subgroup_robustness.report import write_report

    rep = write_report(sweep, sr_env / "report", n_boot=300)
    table = rep["summary"].set_index("setting")
    assert set(table.index) == {"base", "dq", "pr40"} and (table["seeds"] == 2).all()
    sig = rep["significance"]
    assert set(sig["setting"]) == {"dq", "pr40"} and len(sig) == 4 and sig["grouped"].all()
    assert table.loc["dq", "size_mb"] < table.loc["base", "size_mb"]

    # relaunched (here with the basic launcher: job folders do not depend on the launcher)
    again = launch([a for a in args if "launcher" not in a] + ["hydra/launcher=basic_graph"], sr_env)
    assert summary(sweep)["skipped"] == 6 and summary(sweep)["done"] == 0
    assert "6 complete (skipped, not launched)" in again.stdout  # the launcher's plan: nothing to run
    second = results(sweep)
    assert {k: v["finished"] for k, v in second.items()} == {k: v["finished"] for k, v in first.items()}


def test_joblib_wave_of_one_job_runs_here_with_every_core(tiny_model_dir, redditbias_root, sr_env):
    """make grid with one seed: the single base fine-tune is a wave of one job, which runs in the launching
    process with all its threads; the jobs after it share the cores between two workers."""
    from subgroup_robustness.utils.perf import physical_cores

    cores = physical_cores()
    if cores < 2:
        pytest.skip("needs two cores to tell one worker's threads from all of them")
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base,dq,pr40", "seed=1",
                    "hydra/launcher=local", "hydra.launcher.n_jobs=2")
    launch(args, sr_env, timeout=600)
    runs = {r["run"]["compressor"]: r for r in results(sr_env / "logs" / "offline_grid" / "multirun").values()}
    assert all(r["status"] == "completed" for r in runs.values()) and len(runs) == 3
    assert runs["none"]["host"]["torch_threads"] == cores
    assert runs["dq"]["host"]["torch_threads"] == runs["pr40"]["host"]["torch_threads"] == max(1, cores // 2)


def test_a_failed_joblib_job_is_recorded_and_the_sweep_goes_on(tiny_model_dir, redditbias_root, sr_env):
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=1", "trainer.max_epochs=1,-5",
                    "hydra/launcher=local", "hydra.launcher.n_jobs=2")
    proc = launch(args, sr_env)
    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    by_status = {r["status"]: r for r in results(sweep).values()}
    assert set(by_status) == {"completed", "failed"}
    assert "max_epochs" in by_status["failed"]["error"]["message"]
    s = summary(sweep)
    assert (s["done"], s["failed"]) == (1, 1) and "max_epochs" in s["failed_jobs"][0]["error"]
    assert "FAILED" in proc.stdout


def test_kill_and_resume_finishes_only_the_missing_jobs(tiny_model_dir, redditbias_root, sr_env):
    """Basic launcher, 4 jobs, two of which fail (max_epochs=-5): killed once the first job is complete,
    relaunched: the first is skipped, the failures are recorded again and do not stop the others."""
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=1,2", "trainer.max_epochs=1,-5")
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    proc = subprocess.Popen([sys.executable, "-m", "subgroup_robustness", *args], cwd=sr_env, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if sweep.exists() and any(r.get("status") == "completed" for r in results(sweep).values()):
                break
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.1)
        else:
            pytest.fail("the first job did not finish in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's own process group, started above
        proc.wait()
    killed = results(sweep)
    finished_first = {k: r["finished"] for k, r in killed.items() if r["status"] == "completed"}
    assert len(finished_first) == 1 and len(killed) <= 2

    proc = launch(args, sr_env)
    after = results(sweep)
    assert sorted(r["status"] for r in after.values()) == ["completed", "completed", "failed", "failed"]
    assert all("max_epochs" in r["error"]["message"] for r in after.values() if r["status"] == "failed")
    s = summary(sweep)
    assert (s["skipped"], s["done"], s["failed"]) == (1, 1, 2)
    for k, finished in finished_first.items():
        assert after[k]["finished"] == finished  # not redone
    assert "FAILED" in proc.stdout and "1 complete (skipped, not launched)" in proc.stdout


def test_submitit_local_runs_one_job(tiny_model_dir, redditbias_root, sr_env):
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=1",
                    "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    launch(args, sr_env)
    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    recs = results(sweep)
    assert len(recs) == 1 and next(iter(recs.values()))["status"] == "completed"
    assert list((sweep / ".submitit").iterdir())  # it went through submitit's job folders


def test_local_and_slurm_launcher_configs_compose():
    cfg = compose(["experiment=offline_grid", "hydra/launcher=local"])
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_.lower()
    cfg = compose(["experiment=paper", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    la = cfg.hydra.launcher
    assert "slurm" in la._target_.lower() and la._target_.endswith("Launcher") and la.partition == "gpu" and la.gpus_per_node == 1
    assert la.array_parallelism > 0 and la.timeout_min > 0 and la.mem_gb > 0


def test_a_job_live_elsewhere_is_not_started_and_is_reported(tiny_model_dir, redditbias_root, sr_env):
    """A job folder whose owner lock is held by a live process (here: this test) is not run by a launch;
    the summary says who runs it; the other job runs."""
    from subgroup_robustness.utils.locks import JobLock

    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    launch(grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=2"), sr_env)  # makes the job's folder
    folder = next(p.parent for p in sweep.rglob("results.json") if "seed=2" in p.parent.name)
    (folder / "results.json").unlink()  # not complete any more: a launch would run it again...
    lock = JobLock(folder)
    assert lock.acquire()  # ...but a live process owns it
    try:
        proc = launch(grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=1,2"), sr_env)
    finally:
        lock.release()
    assert "1 live elsewhere (not launched)" in proc.stdout
    s = summary(sweep)
    assert (s["done"], s["elsewhere"]) == (1, 1) and f"pid {os.getpid()}" in s["elsewhere_jobs"][0]["owner"]
    assert not (folder / "results.json").exists()  # never started by the launch


def test_slurm_presets_compose_with_the_documented_options():
    la = compose(["experiment=offline_grid", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=cpu",
                  "hydra.launcher.account=lab", "hydra.launcher.qos=short", "hydra.launcher.constraint=avx512"]).hydra.launcher
    assert la._target_.endswith("SlurmGraphLauncher") and la.gpus_per_node == 0 and la.cpus_per_task == 4
    assert (la.partition, la.account, la.qos, la.constraint) == ("cpu", "lab", "short", "avx512")
    assert la.max_requeue >= 1 and la.signal_delay_s > 0 and la.setup and not any("activate" in x for x in la.setup)
    gpu = compose(["hydra/launcher=slurm"]).hydra.launcher
    assert gpu.gpus_per_node == 1 and gpu.mem_gb >= 16 and gpu.timeout_min >= 60
    grid = compose(["experiment=offline_grid"]).hydra.launcher  # make grid: two joblib workers
    assert grid._target_.endswith("JoblibGraphLauncher") and grid.n_jobs == 2
    assert compose(["experiment=offline_grid", "hydra/launcher=basic_graph"]).hydra.launcher._target_.endswith(
        "BasicGraphLauncher")


def test_job_names_and_host_dependent_identity():
    from omegaconf import OmegaConf, open_dict

    from subgroup_robustness.experiment import run_identity
    from subgroup_robustness.launchers import job_name, same_identity
    from subgroup_robustness.utils.compose import compose as sr_compose

    cfg = sr_compose(["experiment=offline_grid", "setting=pr40", "seed=3"], out_dir="/tmp/x", resolve=False,
                     fresh=True)
    assert job_name(cfg, ["setting=pr40", "seed=3"]) == "redditbias-pr40-s3"
    assert job_name(cfg, ["compressor=pr40", "model=bert_tiny", "seed=3"]).startswith("redditbias-")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    stored = {"run_id": run_identity(cfg), "config": resolved}
    assert same_identity(cfg, stored)
    # the same job resolved on another machine: `auto` precision became bf16 there
    other = OmegaConf.create(resolved)
    with open_dict(other):
        other.trainer.precision = "bf16-mixed" if resolved["trainer"]["precision"] != "bf16-mixed" else "32-true"
    gpu_record = {"run_id": run_identity(other), "config": OmegaConf.to_container(other)}
    assert same_identity(cfg, gpu_record)  # recognised: the host-dependent value is taken from the record
    with open_dict(other):
        other.seed = 4
    assert not same_identity(cfg, {"run_id": run_identity(other), "config": OmegaConf.to_container(other)})


def test_slurm_reasons_and_outcome_records(tmp_path):
    from subgroup_robustness.launchers import PlannedJob, normal_state, record_slurm_end, slurm_reason

    params = {"timeout_min": 60, "mem_gb": 4}
    assert normal_state("CANCELLED by 1000") == "CANCELLED" and normal_state("") == "UNKNOWN"
    err = "slurmstepd: error: *** JOB 12 ON node3 CANCELLED AT 2026-01-01T10:00:00 DUE TO TIME LIMIT ***"
    assert slurm_reason("TIMEOUT", "TIMEOUT", err, params, {"NodeList": "node3"}) == \
        "time limit reached (60 min, hydra.launcher.timeout_min) (at 2026-01-01T10:00:00, on node3)"
    assert slurm_reason("CANCELLED", "CANCELLED by 1000", "", params, {}) == "cancelled (scancel by uid 1000)"
    oom = "slurmstepd: error: Detected 1 oom_kill event in StepId=12.0. Some of the step tasks have been OOM Killed."
    assert slurm_reason("OUT_OF_MEMORY", "OUT_OF_MEMORY", oom, params, {}).startswith("out of memory: the job used more than its 4 GB")
    assert slurm_reason("NODE_FAIL", "NODE_FAIL", "", params, {}) == "its node failed"

    job = PlannedJob(3, ["seed=1"], out_dir=str(tmp_path / "job"), label="job", run_id="abc",
                     summary={"dataset": "d", "compressor": "none", "seed": 1})
    line = record_slurm_end(job, {"job_id": "12", "state": "CANCELLED", "reason": "cancelled (scancel)"})
    rec = json.loads((tmp_path / "job" / "results.json").read_text())  # a job that never started: a record all the same
    assert line == "SLURM CANCELLED: cancelled (scancel)"
    assert (rec["status"], rec["error"]["type"], rec["slurm"]["job_id"], rec["run"]["dataset"]) == \
        ("failed", "SLURM CANCELLED", "12", "d")
    rec.update(status="completed", error=None)  # a job that completed just before SLURM ended it stays complete
    (tmp_path / "job" / "results.json").write_text(json.dumps(rec))
    record_slurm_end(job, {"job_id": "12", "state": "TIMEOUT", "reason": "time limit reached"})
    assert json.loads((tmp_path / "job" / "results.json").read_text())["status"] == "completed"


def test_progress_counts_eta_and_summary(tmp_path):
    from subgroup_robustness.sweep import (counts_text, eta_seconds, fmt_eta, record_state, tally,
                                           write_summary)
    from subgroup_robustness.utils.io import atomic_write_json

    folder = tmp_path / ".progress" / "launch1"
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 300))  # 5 minutes ago
    atomic_write_json(folder / "total.json", {"total": 6, "started": started})
    record_state(folder, 0, "a", "/x/a", "done", seconds=100.0)
    record_state(folder, 1, "b", "/x/b", "done", seconds=200.0)
    record_state(folder, 2, "c", "/x/c", "skipped")
    record_state(folder, 3, "d", "/x/d", "failed", "SLURM TIMEOUT: time limit reached", slurm={"job_id": "7"})
    record_state(folder, 4, "e", "/x/e", "running")
    t = tally(folder)
    assert t["counts"] == {"done": 2, "skipped": 1, "failed": 1, "elsewhere": 0, "running": 1}
    assert t["eta_s"] == pytest.approx(300 / 3 * 2, abs=10)  # 300 s for 3 jobs run (2 done, 1 failed) x 2 left
    assert eta_seconds({"done": 1}, 3, [60.0], parallel=2) == pytest.approx(60.0)
    # without the launch's start: mean 150 s x 2 jobs left, one running at a time
    assert eta_seconds(t["counts"], 6, [100.0, 200.0]) == pytest.approx(150.0 * 2 / 1)
    assert fmt_eta(None) == "ETA ?" and fmt_eta(30) == "ETA ~30 s" and fmt_eta(600) == "ETA ~10 min"
    text = counts_text(t["counts"], 6, t["eta_s"], pending=1)
    assert text == "4/6 finished · done 2 · skipped 1 · failed 1 · running 1 · pending 1 · ETA ~3 min"
    s = write_summary(tmp_path, folder)
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == s
    assert s["state"] == "finished" and s["failed_jobs"] == [
        {"job": "d", "dir": "/x/d", "error": "SLURM TIMEOUT: time limit reached", "slurm": {"job_id": "7"}}]


def test_help_page_shows_the_projects_examples(tmp_path):
    from tests.helpers import run_cli

    proc = run_cli(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for text in ("python -m subgroup_robustness", "experiment=offline_grid", "hydra/launcher=slurm",
                 "hydra/launcher=local", "python -m subgroup_robustness.report", "setting:", "docs/cluster.md"):
        assert text in out, text


# ---- group metrics under DDP ----------------------------------------------------------------------------
def _toy_eval_set():
    import torch

    gen = torch.Generator().manual_seed(0)
    n, g = 203, 5
    masks = torch.nn.functional.one_hot(torch.randint(0, g, (n,), generator=gen), g).bool()
    return torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen), masks


def _ddp_worker(rank: int, world: int, port: int, batches: list, out: str) -> None:
    import torch.distributed as dist

    from subgroup_robustness.metrics.group_metrics import GroupAccuracy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    preds, target, masks = _toy_eval_set()
    metric = GroupAccuracy([f"g{i}" for i in range(masks.shape[1])])
    for batch in batches[rank]:
        metric.update(preds[batch], target[batch], masks[batch])
    res = metric.compute()  # torchmetrics sums the states of both processes here
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def test_group_counts_are_summed_across_two_real_processes(tmp_path):
    """Each process evaluates its shard of the bucketed evaluation batches; the merged metric equals the
    single-process one."""
    import socket

    import numpy as np
    import torch.multiprocessing as mp

    from subgroup_robustness.data.datamodule import BucketBatchSampler
    from subgroup_robustness.metrics.group_metrics import GroupAccuracy

    preds, target, masks = _toy_eval_set()
    lengths = np.random.default_rng(0).integers(5, 40, len(preds))
    batches = [list(BucketBatchSampler(lengths, 16, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, port, batches, str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    single = GroupAccuracy([f"g{i}" for i in range(masks.shape[1])])
    single.update(preds, target, masks)
    ref = single.compute()
    assert ddp["n"] == len(preds) == ref["n"]  # every example counted once: no padding duplicates in evaluation
    assert ddp["count"] == ref["count"] and ddp["acc"] == pytest.approx(ref["acc"])
    assert ddp["acc_wg"] == pytest.approx(ref["acc_wg"]) and ddp["acc_avg"] == pytest.approx(ref["acc_avg"])


def test_ddp_trainer_config_shards_itself():
    cfg = compose(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.use_distributed_sampler is False


def test_waves_put_only_the_bases_others_follow_first():
    """One-seed offline grid: the base alone first; QAT and vocabulary transfer (no base needed) run with
    the followers, so a parallel launcher never waits for them at a wave's end before followers start."""
    from subgroup_robustness.launchers import SKIP, PlannedJob, plan_text, waves

    base, qat, dq, pr40 = (PlannedJob(i, [f"setting={s}"]) for i, s in enumerate(("base", "qat", "dq", "pr40")))
    dq.after = pr40.after = base.idx
    done = PlannedJob(4, ["setting=sq"], action=SKIP, after=base.idx)
    assert [[j.idx for j in w] for w in waves([base, qat, dq, pr40, done])] == [[0], [1, 2, 3]]
    assert plan_text([base, qat, dq, pr40, done]) == \
        "5 jobs: 4 to run, 1 complete (skipped, not launched); 1 base fine-tune first, 3 jobs after it"
    assert [[j.idx for j in w] for w in waves([qat, PlannedJob(5, ["seed=2"])])] == [[1, 5]]  # nothing to wait for
