"""The grid: experiment configs, deterministic job folders, joblib / basic / submitit_local launchers,
skip-on-relaunch, kill-and-resume, failed jobs recorded without stopping the sweep, group metrics under
two real (gloo) processes, and W&B offline logging."""

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

from tests.helpers import CONF, compose, run_in_process, tiny_overrides

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
    assert len(settings) >= 14
    for s in settings:
        cfg = compose(["experiment=offline_grid", f"setting={s}"])
        assert (cfg.model.name, cfg.compressor.name) == ("minilm_l6", "none" if s == "base" else s)
        assert cfg.dataset.name == "redditbias" and cfg.dataset.subsample.train == 4000
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
    return ["--multirun", "experiment=offline_grid", "model=local", f"model.path={tiny_model_dir}",
            f"dataset.source.root={redditbias_root}", "trainer.max_epochs=1", "trainer.precision=32-true",
            "logger=none", "print_config=false", "callbacks.progress=null", *extra]


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
    """3 settings x 2 seeds in 2 parallel joblib workers; the report reads it; a relaunch redoes nothing."""
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base,dq,pr40", "seed=1,2",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    proc = launch(args, sr_env)
    sweep = sr_env / "logs" / "offline_grid" / "multirun"
    first = results(sweep)
    assert len(first) == 6 and all(r["status"] == "completed" for r in first.values())
    assert {(r["run"]["compressor"], r["run"]["seed"]) for r in first.values()} == \
        {(c, s) for c in ("none", "dq", "pr40") for s in (1, 2)}
    assert all(d.startswith("redditbias/model=local,seed=") and ",h=" in d for d in first)
    assert (summary(sweep)["done"], summary(sweep)["failed"]) == (6, 0)
    assert "[sweep" in proc.stdout and "done 6" in proc.stdout

    from subgroup_robustness.report import write_report

    rep = write_report(sweep, sr_env / "report", n_boot=300)
    table = rep["summary"].set_index("setting")
    assert set(table.index) == {"base", "dq", "pr40"} and (table["seeds"] == 2).all()
    sig = rep["significance"]
    assert set(sig["setting"]) == {"dq", "pr40"} and len(sig) == 4 and sig["grouped"].all()
    assert table.loc["dq", "size_mb"] < table.loc["base", "size_mb"]

    # relaunched (here with the basic launcher: job folders do not depend on the launcher)
    again = launch([a for a in args if "launcher" not in a], sr_env)
    assert summary(sweep)["skipped"] == 6 and summary(sweep)["done"] == 0
    assert "6 complete (skipped, not launched)" in again.stdout  # the launcher's plan: nothing to run
    second = results(sweep)
    assert {k: v["finished"] for k, v in second.items()} == {k: v["finished"] for k, v in first.items()}


def test_a_failed_joblib_job_is_recorded_and_the_sweep_goes_on(tiny_model_dir, redditbias_root, sr_env):
    args = grid_cli(tiny_model_dir, redditbias_root, "setting=base", "seed=1", "trainer.max_epochs=1,-5",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
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


# ---- W&B ------------------------------------------------------------------------------------------------
def test_wandb_offline_run_has_family_summary_and_group_table(tiny_model_dir, redditbias_root, sr_env, monkeypatch,
                                                              caplog):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(sr_env / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "logger=wandb",
                                        "experiment_name=wb"))
    assert rec["status"] == "completed", rec.get("error")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(out.rglob("*"))[:20]
    files = runs[0] / "files"
    tables = list((files / "media" / "table").glob("group_metrics_*.table.json"))
    assert tables, (list(files.rglob("*")), caplog.text[-3000:])
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["split", "grouping", "group"]
    test_rows = {r[2]: r[4] for r in table["data"] if r[0] == "test"}
    assert test_rows == pytest.approx(rec["groups"]["test"]["groups"]["acc"]) and len(test_rows) == 10
    raw = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline: the summary lives in the run file
    assert b"size_mb" in raw and b"test/acc_wg" in raw and b"wb/redditbias" in raw  # grouped experiment/dataset


def test_wandb_summary_tags_the_family_and_tables_every_group():
    from subgroup_robustness.report.wandb_log import COLUMNS, log_summary

    class FakeRun:
        def __init__(self):
            self.tags, self.summary, self.logged = ("offline_grid",), {}, []

        def log(self, data):
            self.logged.append(data)

    class WandbLogger:  # matched by class name, as Lightning's
        def __init__(self):
            self.experiment = FakeRun()

    res = {"acc": {"a": 0.5, "b": None}, "count": {"a": 4, "b": 0}}
    record = {"run": {"family": "pruning", "compressor": "pr40", "dataset": "redditbias", "seed": 2},
              "model": {"size_mb": 80.0, "params": 2e7},
              "metrics": {"test": {"test/acc_wg": 0.5, "test/acc_avg": 0.6, "test/acc/a": 0.5}},
              "groups": {"test": {"groups": res}}, "base": {"groups": {"test": {"groups": {"acc": {"a": 0.75}}}}}}
    lg = WandbLogger()
    log_summary([lg, object()], record)
    run = lg.experiment
    assert run.tags == ("offline_grid", "pruning", "pr40", "redditbias")
    assert run.summary == {"size_mb": 80.0, "params": 2e7, "compressor": "pr40", "family": "pruning", "seed": 2,
                           "test/acc_wg": 0.5, "test/acc_avg": 0.6}
    table = run.logged[0]["group_metrics"]
    assert table.columns == COLUMNS
    assert table.data == [["test", "groups", "a", 4, 0.5, 0.75], ["test", "groups", "b", 0, None, None]]
