"""What a W&B run gets at the end of a job, beyond Lightning's curves: the family as a tag (runs are
already grouped by experiment/dataset and typed by family in conf/logger/wandb.yaml), size and accuracy
in the summary (the x and y of a "worst-group accuracy vs size" scatter panel), and every group's
accuracy as a ``wandb.Table``."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ["split", "grouping", "group", "count", "acc", "base_acc"]


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
    runs = [lg.experiment for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if not runs:
        return
    import wandb

    run_info, model = record.get("run") or {}, record.get("model") or {}
    test = (record.get("metrics") or {}).get("test") or {}
    for run in runs:
        if not hasattr(run, "log"):  # a non-zero DDP rank's dummy experiment
            continue
        extra = [t for t in (run_info.get("family"), run_info.get("compressor"), run_info.get("dataset")) if t]
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), *extra]))
        run.summary.update({"size_mb": model.get("size_mb"), "params": model.get("params"),
                            "compressor": run_info.get("compressor"), "family": run_info.get("family"),
                            "seed": run_info.get("seed"),
                            **{k: v for k, v in test.items() if k in ("test/acc_avg", "test/acc_wg")}})
        run.log({"group_metrics": wandb.Table(columns=COLUMNS, data=group_rows(record))})
