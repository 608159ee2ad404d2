"""One run in three steps: ``prepare`` (process settings, the chain's stages, the data module, loggers,
and the model it starts from: the cached fine-tuned base or the pretrained model), ``execute`` (the
stages and the one fine-tuning schedule of ``chain.fit_schedule``) and ``record`` (results.json and
predictions.npz through ``results.py``). ``run`` strings them together and never edits its config: a
chain is expanded at the entry point (``run.task``) before the run's identity is taken.

The run owns every assignment of the model, the tokenizer and the teacher: a compressor receives the
:class:`RunContext` as a read-only ``CompressionContext`` and returns a ``Compressed``. Size, parameters,
dtypes and CPU latency are measured here before and after every stage. Nothing here knows a dataset or a
compressor by name."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.chain import fit_schedule, validate_chain
from subgroup_robustness.compression.context import Compressed
from subgroup_robustness.data.datamodule import GroupDataModule
from subgroup_robustness.data.groups import PRIMARY, is_multilabel
from subgroup_robustness.evaluation import (extra_test_set_lines, extra_test_sets, print_multilabel_table,
                                             worst_group_line)
from subgroup_robustness.metrics.callbacks import (BestWeights, EpochCheckpoint, GroupMetrics, sorted_predictions,
                                                   sorted_probabilities)
from subgroup_robustness.metrics.comparison import prediction_metrics
from subgroup_robustness.metrics.degenerate import degeneracy
from subgroup_robustness.metrics.probe import dfr_probe, encoder_features
from subgroup_robustness.metrics.group_metrics import flatten_metrics, is_multilabel_result
from subgroup_robustness.models.base_cache import BaseCache, base_key
from subgroup_robustness.models.classifier import SequenceClassifier
from subgroup_robustness.models.figures import cpu_latency_ms, model_figures
from subgroup_robustness.models.loading import load_model
from subgroup_robustness.models.precision import precision_plugin
from subgroup_robustness.report.wandb_log import log_config, log_summary
from subgroup_robustness.results import (PREDICTIONS_FILE, RESULTS_FILE, base_record, encode_predictions,
                                         read_predictions, read_record, example_metadata, write_results)
from subgroup_robustness.utils.console import console, print_group_table
from subgroup_robustness.utils.errors import instantiate_or_explain
from subgroup_robustness.utils.io import atomic_write_bytes, flatten, stable_hash
from subgroup_robustness.utils.locks import JobLock
from subgroup_robustness.utils.perf import configure_process, release_memory

log = logging.getLogger(__name__)

from subgroup_robustness.results import RUN_KEYS_EXCLUDED, identity_payload  # noqa: E402,F401 - re-exported


def run_identity(cfg: DictConfig) -> str:
    """Hash of the resolved config minus output paths and logging: the run's identity. A stored result is
    reused only when its identity equals the new one."""
    return stable_hash(identity_payload(cfg), 16)


def build_stages(compressor_cfg: DictConfig) -> list[Compressor]:
    """The chain's compressors, their arguments checked (constructors validate) and their order checked,
    before any model or data is loaded."""
    stages = [instantiate_or_explain(s) for s in (compressor_cfg.get("stages") or [])]
    validate_chain(stages, compressor_cfg.get("members"))
    return stages


def starts_from_base(cfg: DictConfig, stages: list[Compressor]) -> bool:
    """The one rule for where a run starts: from the cached fine-tuned base when its first stage asks for
    it, or when it has no stages (``compressor=none`` *is* the base and fills the cache; ``cache_base=false``
    fine-tunes outside it); otherwise from the pretrained model."""
    if stages:
        return stages[0].start_from == "finetuned"
    return bool(cfg.get("cache_base", True))


@dataclass
class RunContext:
    """The run's state. Satisfies ``compression.context.CompressionContext``; only the experiment writes it."""

    cfg: DictConfig
    data: GroupDataModule
    workdir: Path
    model: Any = None
    tokenizer: Any = None
    teacher: Any = None  # the model a 'during' stage distils from, for the fine-tuning right after it
    base: dict[str, Any] | None = None  # the cached fine-tuned base's record, when the run started from it
    base_evals: dict[str, Any] | None = None  # set when the base was fine-tuned (and tested) in this run
    loggers: list = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    # the last fit's module, its precision and device, and the selected epoch's scores (GroupMetrics.scored)
    fitted: dict[str, Any] | None = None

    # ---- the CompressionContext surface ------------------------------------------------------------
    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def model_spec(self) -> Mapping[str, Any]:
        return OmegaConf.to_container(self.cfg.model, resolve=True)  # type: ignore[return-value]

    @property
    def label_names(self) -> list[str]:
        return list(self.cfg.dataset.label_names)

    def model_config(self, name: str) -> Mapping[str, Any]:
        from subgroup_robustness.utils.compose import compose_group

        return compose_group("model", name)

    def make_trainer(self, **overrides: Any) -> L.Trainer:
        """A Trainer from the run's trainer config for a compressor's own training: no loggers, no
        checkpoints, the run's progress bar."""
        progress = (self.cfg.get("callbacks") or {}).get("progress")
        callbacks = [*( [_instantiate_callback(progress)] if progress else []), *overrides.pop("callbacks", [])]
        kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=bool(progress),
                      default_root_dir=str(self.workdir), callbacks=callbacks)
        kwargs.update(overrides)
        return instantiate(self.cfg.trainer, **kwargs)

    def take(self, result: Compressed | None) -> None:
        """Apply what a stage returned; re-tokenise the data when the tokenizer changed."""
        if result is None:
            return
        self.model = result.model
        if result.tokenizer is not None and result.tokenizer is not self.tokenizer:
            self.tokenizer = result.tokenizer
            self.data.set_tokenizer(self.tokenizer)
        if result.teacher is not None:  # kept until the fine-tuning after it ends (execute drops it)
            self.teacher = result.teacher

    # ---- models ---------------------------------------------------------------------------------
    def pretrained(self):
        return load_model(self.cfg.model, len(self.label_names), self.label_names)

    def new_module(self) -> SequenceClassifier:
        objective = instantiate(self.cfg.objective) if self.cfg.get("objective") else None
        self.model.train()  # from_pretrained returns eval mode; dropout belongs to fine-tuning
        return instantiate(self.cfg.module)(model=self.model, objective=objective)

    def finetuned_base(self):
        """The fine-tuned base of this dataset/model/seed: from the cache, or trained now and cached."""
        cache = BaseCache(Path(self.cfg.paths.cache_dir) / "bases")
        key = base_key(self.cfg)

        def train():
            t0 = time.perf_counter()
            self.model, self.tokenizer = self.pretrained()
            self.data.set_tokenizer(self.tokenizer)
            module = self.new_module()
            self.fit(module, "base_finetune")
            evals = self.evaluate(module, "base_eval")
            self.base_evals = evals  # compressor=none: this evaluation is the run's own
            info = {"key": key, "figures": model_figures(self.model), "groups": evals["groups"],
                    "metrics": evals["metrics"], "train_s": time.perf_counter() - t0,
                    "latency_ms_per_example": evals["latency_ms_per_example"]}
            files = {}
            if evals["predictions"] is not None:  # what every later run of this base compares against
                files[PREDICTIONS_FILE] = self.prediction_bytes(evals)
            return self.model, self.tokenizer, info, files

        model, tokenizer, info, reused = cache.get_or_train(key, train)
        info = dict(info, reused=reused, cache_dir=str(cache.entry(key)), cache_notes=list(cache.notes))
        console.print(f"[dim]fine-tuned base {'reused from' if reused else 'stored in'} {cache.entry(key)}[/dim]")
        return model, tokenizer, info

    # ---- training and evaluation --------------------------------------------------------------
    def _callbacks(self, training: bool) -> list[L.Callback]:
        out = []
        for _, spec in (self.cfg.get("callbacks") or {}).items():
            if spec is None:
                continue
            if not training and spec.get("fit_only", False):
                continue
            out.append(_instantiate_callback(spec))
        if not any(isinstance(c, GroupMetrics) for c in out):
            out.append(GroupMetrics())
        return out

    def trainer(self, training: bool, on_cpu: bool = False, extra_callbacks: tuple = (), **overrides) -> L.Trainer:
        kwargs: dict[str, Any] = {}
        if on_cpu:
            kwargs.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
        kwargs.update(overrides)
        plugin = precision_plugin(kwargs.get("precision", self.cfg.trainer.get("precision")),
                                  kwargs.get("accelerator", self.cfg.trainer.get("accelerator")))
        if plugin is not None:  # Lightning refuses a precision string next to a precision plugin
            kwargs.update(precision=None, plugins=[*kwargs.get("plugins", []), plugin])
        if os.environ.get("SLURM_JOB_ID"):  # submitit requeues (bounded, launchers.py), not Lightning
            from lightning.pytorch.plugins.environments import SLURMEnvironment

            kwargs["plugins"] = [*kwargs.get("plugins", []), SLURMEnvironment(auto_requeue=False)]
        return instantiate(self.cfg.trainer, callbacks=[*self._callbacks(training), *extra_callbacks],
                           logger=self.loggers or False, default_root_dir=str(self.workdir), **kwargs)

    def fit(self, module: SequenceClassifier, phase: str, precision: str | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if hasattr(module.objective, "setup"):
            dm = self.data
            dm.setup()
            counts = dm.primary.masks(dm.splits["train"].metadata).sum(0)
            module.objective.setup(dm.primary, counts)
        ckpt = self.checkpoint_path(phase)
        resume = ckpt if ckpt is not None and ckpt.is_file() else None
        extra = (EpochCheckpoint(ckpt),) if ckpt is not None else ()
        trainer = self.trainer(training=True, extra_callbacks=extra, **({"precision": precision} if precision else {}))
        if resume is not None:
            console.print(f"[yellow]resuming[/yellow] {phase} from its last finished epoch ({resume})")
        trainer.fit(module, datamodule=self.data, ckpt_path=resume, weights_only=True if resume else None)
        best = next((c for c in trainer.callbacks if isinstance(c, BestWeights)), None)
        gm = next((c for c in trainer.callbacks if isinstance(c, GroupMetrics)), None)
        # one process only: GroupMetrics scores the whole test split on every rank, where the test loop shards it
        scored = (gm.scored.get(best.best_step) if gm is not None and best is not None and best.restored
                  and trainer.world_size == 1 else None)
        self.fitted = {"module": module, "model": module.model, "precision": str(trainer.precision),
                       "device": str(trainer.strategy.root_device), "scored": scored}
        info = {"phase": phase, "epochs": trainer.current_epoch, "steps": trainer.global_step,
                "resumed_from": str(resume) if resume else None,
                "monitor": getattr(best, "monitor", None), "history": list(getattr(gm, "history", [])),
                "precision": str(trainer.precision),
                "best_epoch": getattr(best, "best_epoch", None), "best_value": getattr(best, "best", None),
                "seconds": time.perf_counter() - t0}
        self.timing[phase] = info["seconds"]
        self.phases.append(info)
        return info

    def evaluate(self, module: SequenceClassifier, phase: str, on_cpu: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        trainer = self.trainer(training=False, on_cpu=on_cpu)
        reused = self._fit_scores(module, trainer, phase)
        if reused is not None:
            return reused
        trainer.validate(module, datamodule=self.data, verbose=False)
        t1 = time.perf_counter()
        trainer.test(module, datamodule=self.data, verbose=False)
        t2 = time.perf_counter()
        gm = next(c for c in trainer.callbacks if isinstance(c, GroupMetrics))
        metrics: dict[str, dict[str, float]] = {}
        for split in ("val", "test"):
            metrics[split] = {}
            for name, res in gm.results[split].items():
                metrics[split].update(flatten_metrics(split, None if name == PRIMARY else name, res))
        n_test = gm.results["test"][PRIMARY]["n"]
        self.timing[phase] = t2 - t0
        return {"eval_source": "validate and test passes",
                "metrics": metrics, "groups": gm.results, "predictions": gm.test_predictions(),
                "probabilities": gm.test_probabilities(),
                "latency_ms_per_example": 1000 * (t2 - t1) / max(1, n_test),
                "eval_device": str(trainer.strategy.root_device)}

    def _fit_scores(self, module: SequenceClassifier, trainer: L.Trainer, phase: str) -> dict[str, Any] | None:
        """The evaluation of ``module`` from its last fit, when that fit scored exactly these weights: the
        module just fitted with its model unchanged since, the selected epoch's weights restored, its test split
        scored then (``history_test``) with predictions, and the same precision and device as this evaluation.
        The metrics are logged as the validate/test passes would; results.json model.eval_source says which."""
        fitted, self.fitted = self.fitted, None
        if not (self.cfg.get("measure") or {}).get("reuse_fit_scores", True) or fitted is None:
            return None
        scored = fitted["scored"]
        if (scored is None or scored["predictions"] is None or fitted["module"] is not module
                or fitted["model"] is not module.model or module.model is not self.model
                or fitted["precision"] != str(trainer.precision)
                or fitted["device"] != str(trainer.strategy.root_device)):
            return None
        metrics: dict[str, dict[str, float]] = {}
        groups = {"val": scored["val"], "test": scored["test"]}
        for split in ("val", "test"):
            metrics[split] = {}
            for name, res in groups[split].items():
                metrics[split].update(flatten_metrics(split, None if name == PRIMARY else name, res))
        # what trainer.validate/test would have logged: float32 values (Lightning's self.log) at their step, 0
        logged = {k: float(torch.tensor(v, dtype=torch.float32)) for m in metrics.values() for k, v in m.items()
                  if isinstance(v, (int, float)) and not math.isnan(v)}
        for lg in self.loggers:
            lg.log_metrics(logged, step=0)
        predictions = sorted_predictions(scored["predictions"])
        n_test = groups["test"][PRIMARY]["n"]
        self.timing[phase] = 0.0
        return {"eval_source": f"the fit's scoring of the selected epoch {scored['epoch']} (measure.reuse_fit_scores)",
                "metrics": metrics, "groups": groups, "predictions": predictions,
                "probabilities": sorted_probabilities(scored["predictions"], scored["probabilities"]),
                "latency_ms_per_example": 1000 * scored["test_seconds"] / max(1, n_test),
                "eval_device": fitted["device"]}

    def prediction_bytes(self, evals: dict[str, Any]) -> bytes:
        """predictions.npz of an evaluation: every test example's label, prediction, class probabilities and
        group metadata (read from the table, so every path that produced the model writes it)."""
        index, label, pred = (evals["predictions"][:, i].numpy() for i in range(3))
        meta = example_metadata(self.data.table, self.data.columns, index)
        probs = evals.get("probabilities")
        extra = {"probs": probs.numpy()} if probs is not None else {}
        return encode_predictions(index, label, pred, meta, **extra)

    def checkpoint_path(self, phase: str) -> Path | None:
        """Where a fine-tuning phase keeps its last finished epoch (``checkpoint.resume``), or None."""
        if not (self.cfg.get("checkpoint") or {}).get("resume", True):
            return None
        # under the run's identity: a checkpoint left by another config in this folder is never resumed
        return self.workdir / "checkpoints" / run_identity(self.cfg) / f"{phase}.ckpt"

    def latency(self) -> float | None:
        """fp32 CPU latency per example over a few test batches (``measure.latency_batches``)."""
        picks = int((self.cfg.get("measure") or {}).get("latency_batches", 4))
        return cpu_latency_ms(self.model, self.data.test_dataloader, picks)


def _instantiate_callback(spec):
    """A callback from its config entry; ``fit_only`` marks callbacks that only make sense while fitting
    (early stopping, best weights, checkpoints) and is not a constructor argument."""
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    spec.pop("fit_only", None)
    return instantiate(spec)


# ---- the three steps ----------------------------------------------------------------------------------
def prepare(cfg: DictConfig, stages: list[Compressor] | None = None) -> RunContext:
    """Process settings, data module (table loaded), loggers, and the model the first stage starts from."""
    # threads = physical cores this process may use; large freed blocks stay mapped; compile caches on disk
    configure_process(cfg.paths.get("cache_dir"))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    stages = build_stages(cfg.compressor) if stages is None else stages
    dm = instantiate(cfg.data, _recursive_=False)
    ctx = RunContext(cfg=cfg, data=dm, workdir=Path(cfg.paths.output_dir))
    ctx.loggers = list(instantiate_loggers(cfg.get("logger")))
    log_config(ctx.loggers, cfg)  # W&B: the resolved config, flattened, from the start
    t0 = time.perf_counter()
    dm.load_table()
    ctx.timing["data_load"] = time.perf_counter() - t0
    if starts_from_base(cfg, stages):
        ctx.model, ctx.tokenizer, ctx.base = ctx.finetuned_base()
    else:
        ctx.model, ctx.tokenizer = ctx.pretrained()
    dm.set_tokenizer(ctx.tokenizer)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return ctx


def execute(ctx: RunContext, stages: list[Compressor]) -> tuple[SequenceClassifier | None, list[dict]]:
    """Run the chain. A stage's fine-tuning is shared with the training 'during' stages right after it
    (``fit_schedule``); the returned module is the last one fine-tuned, or None when the model changed after
    it. Without stages, the model is fine-tuned here unless it is the cached base."""
    if not stages:
        module = ctx.new_module()
        if ctx.base is None:  # cache_base=false: fine-tune here, outside the cache
            ctx.fit(module, "finetune")
        return module, []
    module = None
    reports: list[dict[str, Any]] = []
    pending: list[Compressor] = []
    for st, fit_now in zip(stages, fit_schedule(stages)):
        t0 = time.perf_counter()
        latency_before = ctx.latency()
        ctx.take(st.apply(ctx))
        if st.trains:
            pending.append(st)
        if fit_now:
            module = ctx.new_module()
            for p in pending:
                p.configure_module(ctx, module)
            precision = next((p.fit_precision for p in pending if p.fit_precision), None)
            ctx.fit(module, f"finetune_{'+'.join(p.name for p in pending)}", precision)
            for p in pending:
                result = p.finalize(ctx)
                if result is not None:
                    ctx.take(result)
                    module = None
            ctx.teacher = None  # held only for the fine-tuning right after the stage that set it
            pending = []
        elif not st.trains:
            ctx.take(st.finalize(ctx))
            module = None
        if module is not None and module.model is not ctx.model:
            module = None
        reports.append({"name": st.name, "family": st.family, "stage": st.stage, "settings": st.settings(),
                        **st.report(ctx), "figures": model_figures(ctx.model),
                        "cpu_latency_ms_per_example": {"before": latency_before, "after": ctx.latency()},
                        "seconds": time.perf_counter() - t0})
    return module, reports


def record(rec: dict[str, Any], ctx: RunContext, stages: list[Compressor], evals: dict[str, Any],
           reports: list[dict[str, Any]], base_figures: dict[str, Any]) -> dict[str, Any]:
    """Fill the run's record and write predictions.npz (with every test example's group metadata)."""
    cfg = ctx.cfg
    rec["metrics"] = evals["metrics"]
    rec["groups"] = evals["groups"]
    rec["model"] = {**model_figures(ctx.model), "latency_ms_per_example": evals["latency_ms_per_example"],
                    "eval_device": evals["eval_device"], "eval_source": evals.get("eval_source")}
    rec["base"] = {"figures": (ctx.base or {}).get("figures", base_figures)}
    if ctx.base:
        rec["base"].update({k: ctx.base.get(k) for k in ("metrics", "groups", "key", "reused", "cache_dir",
                                                          "latency_ms_per_example", "cache_notes")})
    rec["compression"] = {"name": cfg.compressor.name, "family": rec["run"]["family"], "stages": reports}
    rec["phases"] = ctx.phases
    if evals["predictions"] is not None:
        atomic_write_bytes(ctx.workdir / PREDICTIONS_FILE, ctx.prediction_bytes(evals))
        rec["predictions"] = PREDICTIONS_FILE
    if evals["predictions"] is not None and not is_multilabel(cfg.dataset):  # single-label: F1, ECE, flips, degeneracy
        rec["metrics"]["test"].update(_prediction_metrics(ctx, rec, stages))
        pred = evals["predictions"][:, 2].numpy()
        rec["degenerate"] = degeneracy(pred, len(ctx.label_names), model=ctx.model, label_names=ctx.label_names)
        if rec["degenerate"]["degenerate"]:
            console.print(f"[bold yellow]degenerate model[/bold yellow]: {'; '.join(rec['degenerate']['reasons'])} "
                          "(flagged in results.json; the report marks it and never ranks it)")
    extra_test_sets(ctx, rec, on_cpu=any(s.eval_on_cpu for s in stages))  # eval_datasets=[...]: test_<name>/...
    if (cfg.get("analysis") or {}).get("probe"):
        rec["probe"] = _probe(ctx, degenerate=bool((rec.get("degenerate") or {}).get("degenerate")))
        rec["metrics"]["probe"] = flatten_metrics("probe", None, rec["probe"]["groups"])
    return rec


def _prediction_metrics(ctx: RunContext, rec: dict[str, Any], stages: list[Compressor]) -> dict[str, float]:
    """Per-group F1, calibration, mean-group / worst-class / balanced accuracy; and, for a compressed run,
    prediction flips and KL against its base's test predictions (the cached base of the same seed)."""
    run_p = read_predictions(ctx.workdir / PREDICTIONS_FILE)
    base_p, against = None, None
    base_file = Path((ctx.base or {}).get("cache_dir") or "") / PREDICTIONS_FILE
    if stages and ctx.base and base_file.is_file():
        base_p, against = read_predictions(base_file), f"cached base {ctx.base.get('key')}"
    try:
        out = prediction_metrics(run_p, ctx.data.groupings, len(ctx.label_names), base=base_p)
    except ValueError as exc:  # e.g. the base scored another subsample: say so, keep the run's own metrics
        rec["comparison"] = {"against": against, "error": str(exc)}
        return prediction_metrics(run_p, ctx.data.groupings, len(ctx.label_names), base=None)
    rec["comparison"] = {"against": against} if against else {"against": None,
                                                                "why": "no base predictions (this run is a base, "
                                                                       "or starts from the pretrained model)"}
    return out


def _probe(ctx: RunContext, degenerate: bool) -> dict[str, Any]:
    """Features or head? DFR on the frozen encoder: a linear head re-fit on the group-balanced validation
    split, scored on test (see metrics/probe.py). On a degenerate model the [CLS] state is probed."""
    import numpy as np
    import torch

    at = "cls" if degenerate else "head"
    g = ctx.data.primary

    def split(loader_factory):
        x, index = encoder_features(ctx.model, loader_factory(), at=at)
        meta = example_metadata(ctx.data.table, ctx.data.columns, index)["metadata"].astype(np.int64)
        return x, meta[:, 0], g.masks(torch.as_tensor(meta)).numpy()

    t0 = time.perf_counter()
    xv, yv, mv = split(ctx.data.val_dataloader)
    xt, yt, mt = split(ctx.data.test_dataloader)
    res = dfr_probe(xv, yv, mv, xt, yt, mt, seed=ctx.seed, group_names=list(g.group_names),
                    num_classes=len(ctx.label_names))
    return {"at": at, "held_out": "val", "settings": res["settings"], "groups": {k: v for k, v in res.items()
                                                                                if k != "settings"},
            "seconds": time.perf_counter() - t0}


def sweep_params() -> dict[str, Any] | None:
    """The sweep lists of the multirun this job belongs to (the report orders rows by them)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        params = HydraConfig.get().sweeper.get("params") or {}
    except ValueError:  # not under Hydra
        return None
    return {"params": {k: str(v) for k, v in params.items()}} if params else None


def run_summary(cfg: DictConfig) -> dict[str, Any]:
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "compressor": cfg.compressor.name,
            "family": cfg.compressor.get("family", "none"), "seed": int(cfg.seed),
            "objective": (cfg.get("objective") or {}).get("name", "erm"),
            "experiment": cfg.get("experiment_name", "default"), "task_name": cfg.get("task_name")}


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Dotted keys whose values differ between two configs (what made a stored result stale)."""
    a, b = flatten(identity_payload(old)), flatten(identity_payload(new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


class Terminated(SystemExit):
    """SIGTERM (a scheduler's cancel or time limit, a parent that went away): recorded, then the process ends."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into an exception inside the job, so its results.json says how it ended instead of
    staying at 'running' (Python's default SIGTERM handling runs no ``finally``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(143)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also after Lightning turned it into ``sys.exit(1)`` inside its KeyboardInterrupt handler."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit)
                                                  and isinstance(exc.__context__, KeyboardInterrupt))


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:  # disk full, read-only folder: name the path
        return f"cannot write or read {exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, Terminated):
        return "terminated by SIGTERM (cancelled, past its time limit, or its parent sweep went away)"
    return str(exc)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job, owned by one live process: skipped when a completed result of the same identity exists,
    re-run (saying which keys changed) when the stored one is stale, corrupt, failed or interrupted."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / RESULTS_FILE
    rid = run_identity(cfg)
    lock = JobLock(out_dir)
    if not lock.acquire():
        console.print(f"[yellow]live elsewhere[/yellow]: {out_dir} is being run by {lock.holder_text}; "
                      "not started twice (relaunch later to pick up its result)")
        return {"status": "live_elsewhere", "skipped": True, "output_dir": str(out_dir), "owner": lock.holder}
    try:
        if lock.note:
            console.print(f"[dim]{lock.note}[/dim]")
        previous, problem = read_record(res_path)
        if problem:
            console.print(f"[yellow]re-running[/yellow]: {problem}")
        if previous and previous.get("status") == "completed":
            if cfg.get("skip_existing", True) and previous.get("run_id") == rid:
                console.print(f"[green]skipped[/green]: {res_path} is already complete "
                              "(skip_existing=false re-runs it)")
                return {**previous, "skipped": True}
            if previous.get("run_id") != rid:
                keys = changed_keys(previous.get("config") or {}, cfg)
                console.print(f"[yellow]re-running[/yellow]: {res_path} was computed with another config "
                              f"(changed: {', '.join(keys) or 'the run identity'})")
        with _sigterm_raises():
            return _run_owned(cfg, out_dir, res_path, rid,
                              previous if (previous or {}).get("status") == "completed" else None)
    finally:
        lock.release()
        release_memory()


def _run_owned(cfg: DictConfig, out_dir: Path, res_path: Path, rid: str,
               completed: dict[str, Any] | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    rec = base_record(rid, run_summary(cfg), OmegaConf.to_container(cfg, resolve=True))
    rec["output_dir"] = str(out_dir)
    rec["sweep"] = sweep_params()
    if completed is None:
        write_results(res_path, rec)
    ctx: RunContext | None = None
    try:
        stages = build_stages(cfg.compressor)
        ctx = prepare(cfg, stages)
        rec["host"]["torch_threads"] = torch.get_num_threads()  # the timings' context (a parallel grid gives fewer)
        base_figures = model_figures(ctx.model)
        module, reports = execute(ctx, stages)
        if not stages and ctx.base_evals is not None:  # the base was just trained and tested
            evals = ctx.base_evals
        else:
            module = module if module is not None else ctx.new_module()
            evals = ctx.evaluate(module, "eval", on_cpu=any(s.eval_on_cpu for s in stages))
        record(rec, ctx, stages, evals, reports, base_figures)
        rec["status"] = "completed"
        if not (cfg.get("checkpoint") or {}).get("keep", False):
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # done: resuming is no longer needed
        return rec
    except BaseException as exc:
        rec["status"] = "interrupted" if _interrupted(exc) else ("terminated" if isinstance(exc, Terminated)
                                                                  else "failed")
        rec["error"] = {"type": type(exc).__name__, "message": _error_message(exc),
                        "traceback": traceback.format_exc(limit=20)}
        raise
    finally:
        if ctx is not None:
            rec["phases"] = ctx.phases
            rec["timing"] = {**ctx.timing, "total": time.perf_counter() - t_start}
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        target = res_path
        if rec["status"] != "completed" and completed is not None:
            # a re-run of a completed job failed: the completed result stays, the failure is kept beside it
            target = out_dir / f"results.{rec['status']}.{time.strftime('%Y%m%d-%H%M%S')}.json"
        try:
            write_results(target, rec)
        except OSError as exc:
            console.print(f"[red]could not write {target}: {exc.strerror or exc}[/red]")
        if ctx is not None and rec["status"] == "completed":
            log_summary(ctx.loggers, rec)  # W&B: family tag, size/accuracy summary, per-group table
        finish_loggers(ctx.loggers if ctx else [])
        if rec["status"] == "completed":
            summarize(rec)


def instantiate_loggers(logger_cfg: DictConfig | None):
    for _, spec in (logger_cfg or {}).items():
        if spec is not None and "_target_" in spec:
            yield instantiate(spec)


def finish_loggers(loggers: list) -> None:
    """Each job ends its W&B run, so multirun jobs never share one."""
    for lg in loggers:
        try:
            lg.finalize("success")
        except Exception:  # noqa: BLE001 - a logger must never hide the run's own outcome
            pass
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def summarize(rec: dict[str, Any]) -> None:
    """The console's group table at the end of a run."""
    run = rec["run"]
    base = (rec.get("base") or {}).get("groups", {}).get("test", {}).get(PRIMARY) if rec.get("base") else None
    title = f"test accuracy by group — {run['dataset']} / {run['model']} / {run['compressor']} / seed {run['seed']}"
    if is_multilabel_result(rec["groups"]["test"][PRIMARY]):
        print_multilabel_table(title.replace("accuracy", "F1"), rec["groups"]["test"][PRIMARY], base)
    else:
        print_group_table(title, rec["groups"]["test"][PRIMARY], base)
    for name, res in rec["groups"]["test"].items():
        if name != PRIMARY:
            console.print(f"  {name}: {worst_group_line(res)}")
    for line in extra_test_set_lines(rec):
        console.print(f"  {line}")
    m = rec["model"]
    console.print(f"  model: {m['params']:,} params, {m['size_mb']:.2f} MB; "
                  f"results: {Path(rec['output_dir']) / RESULTS_FILE}")
