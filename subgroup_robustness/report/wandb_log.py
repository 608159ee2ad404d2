"""Weights & Biases as a dashboard of the grid.

* ``WandbLogger`` (conf/logger/wandb.yaml): Lightning's, with one x-axis for the whole run. Every trainer of
  a run (the fine-tuning, a compressor's own fine-tuning, the final validate/test) starts at step 0;
  here each continues where the previous one ended, so per-epoch validation metrics sit at their training
  step and the final validation and test metrics at the run's last step (not at step 0). A W&B run that
  cannot start online (no network: ``wandb.init`` times out after ``WANDB_INIT_TIMEOUT``, 60 s here) falls
  back to offline instead of failing the job.
* :func:`log_config`: the resolved config, flattened (``dataset.name``, ``compressor.family``,
  ``trainer.max_epochs``, ...), plus ``run.*`` keys (dataset, model, compressor, family, seed, objective,
  experiment) to group runs by in the W&B UI.
* :func:`log_summary`, at the end of a job: the family and compressor as tags, size and accuracy in the
  summary (the x and y of a "worst-group accuracy vs size" scatter panel), and every group's accuracy as a
  ``wandb.Table``, at the run's last step. It also applies the config from the record, for runs whose
  config was not logged at the start.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from subgroup_robustness.utils.io import flatten

log = logging.getLogger(__name__)

COLUMNS = ["split", "grouping", "group", "count", "acc", "base_acc"]
RUN_KEYS = ("dataset", "model", "compressor", "family", "seed", "objective", "experiment")
STEP_KEY = "trainer/global_step"
# not what a run computes, or unbounded in size: left out of the W&B config
CONFIG_EXCLUDED = ("hydra",)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with one step axis across the run's trainers and an offline fallback.
    (Named like Lightning's: the experiment finishes W&B runs of loggers by that class name.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # W&B warns about the setting even when unset
        self._step_offset = 0
        self._last_step = 0

    @property
    def last_step(self) -> int:
        """The run's last step so far (the x of its final metrics)."""
        return self._last_step

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            step = self._step_offset + int(step)
            self._last_step = max(self._last_step, step)
        super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        self._step_offset = self._last_step  # the next trainer of this run goes on from here

    @property
    def experiment(self) -> Any:
        try:
            return _LightningWandbLogger.experiment.fget(self)
        except Exception as exc:  # noqa: BLE001 - W&B must never fail the job
            if self._offline or self._wandb_init.get("mode") in ("offline", "disabled"):
                raise
            log.warning("W&B could not start online (%s: %s); logging offline under %s instead (upload it "
                        "later: timeout 600 wandb sync <dir>/wandb/offline-run-*)", type(exc).__name__, exc,
                        self._wandb_init.get("dir"))
            self._offline = True
            self._wandb_init["mode"] = "offline"
            return _LightningWandbLogger.experiment.fget(self)


def _wandb_runs(loggers: list) -> list:
    return [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]


def run_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """What runs are grouped by: ``run.dataset``, ``run.model``, ``run.compressor``, ``run.family``,
    ``run.seed``, ``run.objective``, ``run.experiment``."""
    def get(*path: str, default: Any = None) -> Any:
        node: Any = config
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                return default
            node = node[p]
        return node

    return {"run.dataset": get("dataset", "name"), "run.model": get("model", "name"),
            "run.compressor": get("compressor", "name"), "run.family": get("compressor", "family", default="none"),
            "run.seed": get("seed"), "run.objective": get("objective", "name", default="erm"),
            "run.experiment": get("experiment_name", default="default")}


def config_payload(cfg: Any) -> dict[str, Any]:
    """The resolved config (a DictConfig or a plain mapping) flattened for W&B, with the ``run.*`` keys."""
    from omegaconf import DictConfig, OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    c = {k: v for k, v in c.items() if k not in CONFIG_EXCLUDED}
    return {**flatten(c), **run_keys(c)}


def log_config(loggers: list, cfg: Any) -> None:
    """Put the run's resolved config into every W&B run of ``loggers`` (a problem is logged, not raised)."""
    try:
        wandb_loggers = _wandb_runs(loggers)
        if not wandb_loggers:
            return
        payload = config_payload(cfg)
        for lg in wandb_loggers:
            run = lg.experiment
            if hasattr(run, "config"):
                run.config.update(payload, allow_val_change=True)
    except Exception:  # noqa: BLE001
        log.warning("could not log the run's config to W&B", exc_info=True)


def group_rows(record: dict[str, Any]) -> list[list[Any]]:
    base_groups = (record.get("base") or {}).get("groups") or {}
    rows = []
    for split, groupings in (record.get("groups") or {}).items():
        for grouping, res in groupings.items():
            base = ((base_groups.get(split) or {}).get(grouping) or {}).get("acc") or {}
            for g, acc in (res.get("acc") or {}).items():
                rows.append([split, grouping, g, int((res.get("count") or {}).get(g) or 0),
                             None if acc is None or acc != acc else float(acc), base.get(g)])
    return rows


def log_summary(loggers: list, record: dict[str, Any]) -> None:
    """Tag, summarize and table a finished job on every WandbLogger among ``loggers``; a W&B problem is
    logged, never raised: the job's results are already safe in results.json."""
    try:
        _log_summary(loggers, record)
    except Exception:  # noqa: BLE001
        log.warning("could not log the run summary to W&B", exc_info=True)


def _log_summary(loggers: list, record: dict[str, Any]) -> None:
    wandb_loggers = _wandb_runs(loggers)
    if not wandb_loggers:
        return
    import wandb

    run_info, model = record.get("run") or {}, record.get("model") or {}
    test = (record.get("metrics") or {}).get("test") or {}
    for lg in wandb_loggers:
        run = lg.experiment
        if not hasattr(run, "log"):  # a non-zero DDP rank's dummy experiment
            continue
        if record.get("config") and hasattr(run, "config"):
            run.config.update(config_payload(record["config"]), allow_val_change=True)
        extra = [t for t in (run_info.get("family"), run_info.get("compressor"), run_info.get("dataset")) if t]
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), *extra]))
        run.summary.update({"size_mb": model.get("size_mb"), "params": model.get("params"),
                            "compressor": run_info.get("compressor"), "family": run_info.get("family"),
                            "seed": run_info.get("seed"),
                            **{k: v for k, v in test.items() if k in ("test/acc_avg", "test/acc_wg")}})
        table = {"group_metrics": wandb.Table(columns=COLUMNS, data=group_rows(record))}
        step = getattr(lg, "last_step", None)
        run.log({**table, STEP_KEY: step} if isinstance(step, int) else table)
