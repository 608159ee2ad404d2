"""The callback that turns predictions + batch metadata into per-group metrics on val and test."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from subgroup_robustness.data.groups import PRIMARY, Grouping, is_multilabel
from subgroup_robustness.metrics.group_metrics import flatten_metrics, group_metric


class GroupMetrics(L.Callback):
    """Needs ``validation_step``/``test_step`` to return ``{"preds": (B,)}``; groups come from the
    datamodule's groupings, so the callback has no dataset knowledge of its own.

    ``save_predictions`` keeps every test prediction (index, label, pred) and its class probabilities
    (float16), for significance tests, prediction flips and calibration that need no re-run.

    A multi-label dataset (``dataset.task: multilabel``) is scored with per-group micro-/macro-F1
    (``GroupMultiLabelF1``); its predictions and labels are label-set bitmasks, its probabilities the
    per-label sigmoids."""

    def __init__(self, save_predictions: bool = True, history_test: bool = True):
        self.save_predictions = save_predictions
        # per fit epoch: the validation metrics and (history_test) the test metrics of that epoch's weights,
        # so another validation-based selection rule can be applied after the fact without re-running
        self.history_test = bool(history_test)
        self.history: list[dict[str, Any]] = []
        # per validation during fit (by global step), in memory only: the full val and test results, the test
        # predictions and the seconds the test pass took, so the run can take the selected epoch's evaluation
        # instead of scoring the same weights again (RunContext.evaluate)
        self.scored: dict[int, dict[str, Any]] = {}
        self.groupings: dict[str, Grouping] = {}
        self.metrics: dict[str, nn.ModuleDict] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, list[torch.Tensor]] = {}
        self.probabilities: dict[str, list[torch.Tensor]] = {}
        self.multilabel = False
        self.num_labels = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "groupings"):
            raise RuntimeError("GroupMetrics needs a GroupDataModule attached to the trainer")
        self.groupings = dm.groupings
        cfg = getattr(dm, "cfg", None) or {}
        self.multilabel = is_multilabel(cfg)
        self.num_labels = len(cfg.get("label_names") or []) if self.multilabel else 0

    def _metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: group_metric(g.group_names, self.multilabel, self.num_labels,
                                                 row_average=g.average == "rows")
                              for name, g in self.groupings.items()})

    def _start(self, split: str, pl_module: L.LightningModule) -> None:
        self.metrics[split] = self._metrics().to(pl_module.device)
        self.predictions[split] = []
        self.probabilities[split] = []

    def _update(self, split: str, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        keep = self.save_predictions and split == "test"
        self._collect(self.metrics[split], outputs, batch, *((self.predictions[split], self.probabilities[split])
                                                             if keep else (None, None)))

    def _collect(self, metrics: nn.ModuleDict, outputs: Any, batch: dict[str, torch.Tensor],
                 predictions: list | None, probabilities: list | None) -> None:
        preds = outputs["preds"]
        meta, target = batch["metadata"], batch["labels"]
        for name, metric in metrics.items():
            metric.update(preds, target, self.groupings[name].masks(meta))
        if predictions is not None:
            predictions.append(torch.stack([batch["index"], target, preds], 1).detach().cpu())
            if outputs.get("probs") is not None:
                probabilities.append(outputs["probs"].detach().to("cpu", torch.float16))

    def _end(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat: dict[str, float] = {}
        result = {}
        for name, metric in self.metrics[split].items():
            res = metric.compute()
            result[name] = res
            flat.update(flatten_metrics(split, None if name == PRIMARY else name, res))
        self.results[split] = result
        loggable = {k: v for k, v in flat.items() if not (isinstance(v, float) and math.isnan(v))}
        # already reduced across processes by torchmetrics: no sync_dist needed
        pl_module.log_dict(loggable, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start("val", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update("val", outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._end("val", trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        entry: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                                 "val": self._flat("val")}
        if self.history_test and trainer.datamodule is not None:
            predictions: list[torch.Tensor] = []
            probabilities: list[torch.Tensor] = []
            t0 = time.perf_counter()
            test = self._score(trainer, pl_module, trainer.datamodule.test_dataloader(), predictions, probabilities)
            entry["test"] = self._flat_of(test, "test")
            self.scored[int(trainer.global_step)] = {
                "epoch": int(trainer.current_epoch), "val": self.results["val"], "test": test,
                "predictions": predictions if self.save_predictions else None, "probabilities": probabilities,
                "test_seconds": time.perf_counter() - t0}
        self.history.append(entry)

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history travels in the epoch checkpoint, so a resumed fit keeps the epochs before."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

    def _flat(self, split: str) -> dict[str, float]:
        return self._flat_of(self.results[split], split)

    @staticmethod
    def _flat_of(result: dict[str, Any], split: str) -> dict[str, float]:
        flat: dict[str, float] = {}
        for name, res in result.items():
            flat.update(flatten_metrics(split, None if name == PRIMARY else name, res))
        return {k: v for k, v in flat.items() if "/count/" not in k}

    @torch.no_grad()
    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, loader, predictions: list | None = None,
               probabilities: list | None = None) -> dict[str, Any]:
        """Group accuracy of the current weights on ``loader`` (the test split during fit), outside
        Lightning's loops so that nothing is logged and no test hooks fire; with ``predictions`` (a list),
        the batches' (index, label, prediction) rows and class probabilities are appended as in a test."""
        metrics = self._metrics().to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        # a DataLoader iterator draws its base seed from the global RNG: without the fork, scoring the test
        # split would shift every later dropout mask and change the trained model
        try:
            with torch.random.fork_rng(devices=[]), trainer.precision_plugin.forward_context():
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    self._collect(metrics, pl_module._eval_step(batch), batch, predictions, probabilities)
        finally:
            pl_module.train(was_training)
        return {name: metric.compute() for name, metric in metrics.items()}

    def on_test_epoch_start(self, trainer, pl_module):
        self._start("test", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update("test", outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end("test", trainer, pl_module)

    def test_predictions(self) -> torch.Tensor | None:
        """(N, 3) long tensor of (example index, label, prediction), sorted by index."""
        return sorted_predictions(self.predictions.get("test"))

    def test_probabilities(self) -> torch.Tensor | None:
        """(N, C) float16 class probabilities in the order of ``test_predictions``."""
        return sorted_probabilities(self.predictions.get("test"), self.probabilities.get("test"))


def sorted_predictions(rows: list[torch.Tensor] | None) -> torch.Tensor | None:
    if not rows:
        return None
    t = torch.cat(rows)
    return t[t[:, 0].argsort()]


def sorted_probabilities(rows: list[torch.Tensor] | None, probs: list[torch.Tensor] | None) -> torch.Tensor | None:
    if not rows or not probs or sum(len(p) for p in probs) != sum(len(r) for r in rows):
        return None
    return torch.cat(probs)[torch.cat(rows)[:, 0].argsort()]


class BestWeights(L.Callback):
    """Keep the best epoch's weights in memory and restore them when fitting ends, so test always
    uses the best model (by ``monitor``) without pickled checkpoints on disk."""

    def __init__(self, monitor: str = "val/acc_avg", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"BestWeights: metric {self.monitor!r} was not logged; logged keys: "
                f"{sorted(trainer.callback_metrics)[:12]}. Set monitor.metric to one of them."
            )
        v = float(value)
        better = self.best is None or (v > self.best if self.mode == "max" else v < self.best)
        if better and not math.isnan(v):
            self.best, self.best_epoch, self.best_step = v, trainer.current_epoch, int(trainer.global_step)
            self._state = {k: t.detach().to("cpu", copy=True) for k, t in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)

    def state_dict(self) -> dict[str, Any]:
        """The best epoch so far (value, epoch, weights) travels in the epoch checkpoint: a resumed fit
        selects among all its epochs, not only the ones after the resume."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step, "weights": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self._state = state.get("best"), state.get("best_epoch"), state.get("weights")
        self.best_step = state.get("best_step")

    @property
    def restored(self) -> bool:
        """Whether fitting ended with the selected epoch's weights put back."""
        return self._state is not None


class EpochCheckpoint(L.Callback):
    """The fit's full state (weights, optimizer, scheduler, loops, callbacks) after every training epoch, in
    one file written atomically, so a run killed by a time limit, a preemption or kill -9 resumes at the last
    finished epoch instead of starting over. The experiment removes it when the job completes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        os.replace(tmp, self.path)
