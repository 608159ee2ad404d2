"""W&B as a dashboard, tested offline from the run files W&B writes (no network, no `wandb sync`): the
resolved config flattened into the run's config (runs group by dataset, model, compressor, family, seed,
objective), per-epoch validation metrics at their training step, test metrics and the per-group table at
the run's last step, WANDB_DIR honoured."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers import run_in_process, tiny_overrides

BLOCK, HEADER = 32768, 7


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file (W&B's LevelDB-style log: a 7-byte file
    header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type 1-4 =
    full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, data[:HEADER]
    records, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):
            parts = chunk
        else:
            parts += chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(parts))
            parts = b""
    return records


def offline_run(records: list) -> dict:
    """config (key -> value), history rows (dicts), summary (key -> value) of a run's records."""
    config, history, summary = {}, [], {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            for item in r.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({(it.key or ".".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item})
        elif kind == "summary":
            for item in r.summary.update:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    config = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    return {"config": config, "history": history, "summary": summary}


@pytest.fixture()
def wandb_offline(sr_env, monkeypatch):
    home = sr_env / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def test_offline_run_carries_the_config_steps_summary_and_group_table(tiny_model_dir, redditbias_root, sr_env,
                                                                       wandb_offline, caplog):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "logger=wandb", "experiment_name=wb",
                                        "trainer.max_epochs=2", "callbacks.early_stopping=null"))
    assert rec["status"] == "completed", rec.get("error")
    assert not list(out.glob("wandb/offline-run-*")), "WANDB_DIR is set: the run belongs there, not in the job folder"
    runs = list((wandb_offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(wandb_offline.rglob("*"))[:20]
    run = offline_run(read_wandb_records(next(runs[0].glob("run-*.wandb"))))

    cfg = run["config"]  # the resolved config, flattened, and the keys to group runs by
    assert cfg["run.dataset"] == "redditbias" and cfg["run.compressor"] == "none" and cfg["run.seed"] == 1
    assert cfg["run.model"] == "local" and cfg["run.family"] == "none" and cfg["run.objective"] == "erm"
    assert cfg["dataset.name"] == "redditbias" and cfg["trainer.max_epochs"] == 2 and cfg["seed"] == 1
    assert cfg["compressor.name"] == "none" and "module.lr" in cfg and not any(k.startswith("hydra") for k in cfg)

    hist = run["history"]
    step = "trainer/global_step"
    train_steps = [h[step] for h in hist if "train/loss" in h]
    last = max(h[step] for h in hist if step in h)
    val_steps = sorted({h[step] for h in hist if "val/acc_wg" in h})
    assert len(val_steps) >= 2 and val_steps[0] > 0  # once per epoch, at that epoch's step (not 0)
    test_rows = [h for h in hist if "test/acc_wg" in h]
    assert test_rows and all(h[step] == last for h in test_rows), (test_rows, last)
    assert last >= max(train_steps, default=0) and last == val_steps[-1]
    tables = [h for h in hist if any(k.startswith("group_metrics") for k in h)]
    assert tables and tables[-1][step] == last

    files = runs[0] / "files"
    table = json.loads(next((files / "media" / "table").glob("group_metrics_*.table.json")).read_text())
    assert table["columns"][:3] == ["split", "grouping", "group"]
    test_acc = {r[2]: r[4] for r in table["data"] if r[0] == "test"}
    assert test_acc == pytest.approx(rec["groups"]["test"]["groups"]["acc"]) and len(test_acc) == 10
    assert run["summary"]["size_mb"] == pytest.approx(rec["model"]["size_mb"])
    assert run["summary"]["test/acc_wg"] == pytest.approx(rec["metrics"]["test"]["test/acc_wg"])


def test_log_config_flattens_the_resolved_config():
    from omegaconf import OmegaConf

    from subgroup_robustness.report.wandb_log import config_payload, log_config

    cfg = OmegaConf.create({"dataset": {"name": "d"}, "model": {"name": "m"}, "seed": 3, "lr": "${x}", "x": 0.1,
                            "compressor": {"name": "pr40", "family": "pruning", "stages": [{"a": 1}]},
                            "objective": {"name": "jtt"}, "experiment_name": "grid", "hydra": {"job": 1}})
    payload = config_payload(cfg)
    assert payload["dataset.name"] == "d" and payload["lr"] == 0.1 and payload["compressor.stages"] == [{"a": 1}]
    assert {k: payload[f"run.{k}"] for k in ("dataset", "model", "compressor", "family", "seed", "objective",
                                             "experiment")} == {
        "dataset": "d", "model": "m", "compressor": "pr40", "family": "pruning", "seed": 3, "objective": "jtt",
        "experiment": "grid"}
    assert not any(k.startswith("hydra") for k in payload)

    class Config(dict):
        def update(self, d, allow_val_change=False):
            super().update(d)

    class Run:
        config = Config()

    class WandbLogger:  # matched by class name
        experiment = Run()

    log_config([WandbLogger(), object()], cfg)
    assert WandbLogger.experiment.config == payload


def test_steps_continue_across_a_runs_trainers():
    """Each trainer of a run starts at step 0; the logger continues the run's axis (finalize ends one)."""
    from subgroup_robustness.report.wandb_log import WandbLogger

    logged = []

    class Run:
        def log(self, data):
            logged.append(data)

    lg = WandbLogger(offline=True, save_dir="/nonexistent")
    lg._experiment = Run()
    for s in (10, 20):  # fit: two epochs' validation
        lg.log_metrics({"val/acc": s}, step=s)
    lg.finalize("success")
    lg.log_metrics({"val/acc": 1.0}, step=0)  # the evaluation trainer: validate, then test
    lg.finalize("success")
    lg.log_metrics({"test/acc": 1.0}, step=0)
    lg.finalize("success")
    for s in (5, 10):  # a second fine-tuning (a compressor's)
        lg.log_metrics({"val/acc": s}, step=s)
    assert [d["trainer/global_step"] for d in logged] == [10, 20, 20, 20, 25, 30] and lg.last_step == 30


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
