"""The stages of one run: data -> model -> compress (before / during / after fine-tuning) -> test ->
record. Everything configurable arrives through the Hydra config; nothing here knows a dataset or a
compressor by name."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from subgroup_robustness.compression.base import Compressor, model_figures
from subgroup_robustness.compression.chain import expand_chain, validate_chain  # noqa: F401 - re-exported
from subgroup_robustness.data.datamodule import GroupDataModule
from subgroup_robustness.data.groups import PRIMARY
from subgroup_robustness.metrics.callbacks import GroupMetrics
from subgroup_robustness.metrics.group_metrics import flatten_metrics
from subgroup_robustness.models.base_cache import BaseCache, base_key
from subgroup_robustness.models.classifier import SequenceClassifier
from subgroup_robustness.models.loading import load_model
from subgroup_robustness.models.precision import precision_plugin
from subgroup_robustness.report.significance import prediction_metadata
from subgroup_robustness.report.wandb_log import log_summary
from subgroup_robustness.results import RESULTS_FILE, base_record, is_completed, read_results, write_results
from subgroup_robustness.utils.console import console, print_group_table
from subgroup_robustness.utils.io import atomic_write_bytes, stable_hash
from subgroup_robustness.utils.perf import configure_process

log = logging.getLogger(__name__)

RUN_KEYS_EXCLUDED = ("paths", "logger", "hydra", "print_config", "skip_existing", "callbacks", "cache_base")


def run_identity(cfg: DictConfig) -> str:
    """Hash of the resolved config minus output paths and logging: the run's identity."""
    c = OmegaConf.to_container(cfg, resolve=True)
    return stable_hash({k: v for k, v in c.items() if k not in RUN_KEYS_EXCLUDED}, 16)


def build_stages(compressor_cfg: DictConfig) -> list[Compressor]:
    stages = [instantiate(s) for s in (compressor_cfg.get("stages") or [])]
    validate_chain(stages, compressor_cfg.get("members"))
    return stages


@dataclass
class RunContext:
    cfg: DictConfig
    datamodule: GroupDataModule
    output_dir: Path
    model: Any = None
    tokenizer: Any = None
    loggers: list = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    base_info: dict[str, Any] | None = None
    base_evals: dict[str, Any] | None = None
    teacher: Any = None  # the fine-tuned base, for compressors that distil from it

    # ---- models ---------------------------------------------------------------------------------
    def pretrained(self):
        ds = self.cfg.dataset
        return load_model(self.cfg.model, len(ds.label_names), list(ds.label_names))

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
            self.datamodule.set_tokenizer(self.tokenizer)
            module = self.new_module()
            self.fit(module, "base_finetune")
            evals = self.evaluate(module, "base_eval")
            self.base_evals = evals  # compressor=none: this evaluation is the run's own
            info = {"key": key, "figures": model_figures(self.model), "groups": evals["groups"],
                    "metrics": evals["metrics"], "train_s": time.perf_counter() - t0,
                    "latency_ms_per_example": evals["latency_ms_per_example"]}
            return self.model, self.tokenizer, info

        model, tokenizer, info, reused = cache.get_or_train(key, train)
        info = dict(info, reused=reused, cache_dir=str(cache.entry(key)))
        console.print(f"[dim]fine-tuned base {'reused from' if reused else 'stored in'} {cache.entry(key)}[/dim]")
        return model, tokenizer, info

    # ---- training and evaluation --------------------------------------------------------------
    def _callbacks(self, training: bool) -> list[L.Callback]:
        out = []
        for name, spec in (self.cfg.get("callbacks") or {}).items():
            if spec is None:
                continue
            if not training and name in ("early_stopping", "best_weights", "model_checkpoint"):
                continue
            out.append(instantiate(spec))
        if not any(isinstance(c, GroupMetrics) for c in out):
            out.append(GroupMetrics())
        return out

    def trainer(self, training: bool, on_cpu: bool = False, **overrides) -> L.Trainer:
        kwargs: dict[str, Any] = {}
        if on_cpu:
            kwargs.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
        kwargs.update(overrides)
        plugin = precision_plugin(kwargs.get("precision", self.cfg.trainer.get("precision")),
                                  kwargs.get("accelerator", self.cfg.trainer.get("accelerator")))
        if plugin is not None:  # Lightning refuses a precision string next to a precision plugin
            kwargs.update(precision=None, plugins=[*kwargs.get("plugins", []), plugin])
        return instantiate(self.cfg.trainer, callbacks=self._callbacks(training), logger=self.loggers or False,
                           default_root_dir=str(self.output_dir), **kwargs)

    def fit(self, module: SequenceClassifier, phase: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        if hasattr(module.objective, "setup"):
            dm = self.datamodule
            dm.setup()
            counts = dm.primary.masks(dm.splits["train"].metadata).sum(0)
            module.objective.setup(dm.primary, counts)
        trainer = self.trainer(training=True)
        trainer.fit(module, datamodule=self.datamodule)
        best = next((c for c in trainer.callbacks if type(c).__name__ == "BestWeights"), None)
        info = {"phase": phase, "epochs": trainer.current_epoch, "steps": trainer.global_step,
                "best_epoch": getattr(best, "best_epoch", None), "best_value": getattr(best, "best", None),
                "seconds": time.perf_counter() - t0}
        self.timing[phase] = info["seconds"]
        self.phases.append(info)
        return info

    def evaluate(self, module: SequenceClassifier, phase: str, on_cpu: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        trainer = self.trainer(training=False, on_cpu=on_cpu)
        trainer.validate(module, datamodule=self.datamodule, verbose=False)
        t1 = time.perf_counter()
        trainer.test(module, datamodule=self.datamodule, verbose=False)
        t2 = time.perf_counter()
        gm = next(c for c in trainer.callbacks if isinstance(c, GroupMetrics))
        metrics: dict[str, dict[str, float]] = {}
        for split in ("val", "test"):
            metrics[split] = {}
            for name, res in gm.results[split].items():
                metrics[split].update(flatten_metrics(split, None if name == PRIMARY else name, res))
        n_test = gm.results["test"][PRIMARY]["n"]
        self.timing[phase] = t2 - t0
        return {"metrics": metrics, "groups": gm.results, "predictions": gm.test_predictions(),
                "latency_ms_per_example": 1000 * (t2 - t1) / max(1, n_test),
                "eval_device": str(trainer.strategy.root_device)}


def _execute(ctx: RunContext, stages: list[Compressor]) -> tuple[SequenceClassifier | None, list[dict]]:
    """Run the chain; consecutive 'before'/'during' stages share one fine-tuning."""
    module = None
    reports: list[dict[str, Any]] = []
    pending: list[Compressor] = []
    if not stages:
        module = ctx.new_module()
        if ctx.base_info is None:  # cache_base=false: fine-tune here, outside the cache
            ctx.fit(module, "finetune")
        return module, reports
    for i, st in enumerate(stages):
        t0 = time.perf_counter()
        st.apply(ctx)
        if ctx.datamodule.tokenizer is not ctx.tokenizer:  # e.g. vocabulary transfer
            ctx.datamodule.set_tokenizer(ctx.tokenizer)
        nxt = stages[i + 1] if i + 1 < len(stages) else None
        if st.trains:
            pending.append(st)
        if pending and not (nxt is not None and nxt.stage == "during" and nxt.trains):
            module = ctx.new_module()
            for p in pending:
                p.configure_module(ctx, module)
            ctx.fit(module, f"finetune_{'+'.join(p.name for p in pending)}")
            for p in pending:
                p.finalize(ctx)
            pending = []
        elif not st.trains:
            st.finalize(ctx)
            module = None
        reports.append({"name": st.name, "family": st.family, "stage": st.stage, "settings": st.settings(),
                        **st.report(ctx), "figures": model_figures(ctx.model),
                        "seconds": time.perf_counter() - t0})
    return module, reports


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / RESULTS_FILE
    if cfg.get("skip_existing", True) and is_completed(res_path):
        console.print(f"[green]skipped[/green]: {res_path} is already complete (skip_existing=false re-runs it)")
        rec = read_results(res_path)
        rec["skipped"] = True
        return rec
    t_start = time.perf_counter()
    configure_process()  # threads = physical cores this process may use; large freed blocks stay mapped
    expand_chain(cfg)  # compressor=chain: the members' stages, before the run's identity is taken
    run = {"dataset": cfg.dataset.name, "model": cfg.model.name, "compressor": cfg.compressor.name,
           "family": cfg.compressor.get("family", "none"), "seed": int(cfg.seed),
           "objective": (cfg.get("objective") or {}).get("name", "erm"),
           "experiment": cfg.get("experiment_name", "default"), "task_name": cfg.get("task_name")}
    record = base_record(run_identity(cfg), run, OmegaConf.to_container(cfg, resolve=True))
    record["output_dir"] = str(out_dir)
    write_results(res_path, record)
    ctx: RunContext | None = None
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        stages = build_stages(cfg.compressor)
        dm = instantiate(cfg.data, _recursive_=False)
        ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=out_dir)
        ctx.loggers = list(instantiate_loggers(cfg.get("logger")))
        t0 = time.perf_counter()
        dm.load_table()
        ctx.timing["data_load"] = time.perf_counter() - t0

        # the uncompressed run IS the fine-tuned base: it fills (or reuses) the cache that post-training
        # compressors start from, so a grid fine-tunes each base once and compares against that very model
        if (stages and stages[0].start_from == "finetuned") or (not stages and cfg.get("cache_base", True)):
            ctx.model, ctx.tokenizer, ctx.base_info = ctx.finetuned_base()
            ctx.teacher = None
        else:
            ctx.model, ctx.tokenizer = ctx.pretrained()
        dm.set_tokenizer(ctx.tokenizer)
        base_figures = model_figures(ctx.model)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

        module, reports = _execute(ctx, stages)
        if module is None:
            module = ctx.new_module()
        on_cpu = any(s.eval_on_cpu for s in stages)
        if not stages and ctx.base_evals is not None:  # the base was just trained and tested
            evals = ctx.base_evals
        else:
            evals = ctx.evaluate(module, "eval", on_cpu=on_cpu)

        record["metrics"] = evals["metrics"]
        record["groups"] = evals["groups"]
        record["model"] = {**model_figures(ctx.model), "latency_ms_per_example": evals["latency_ms_per_example"],
                           "eval_device": evals["eval_device"]}
        record["base"] = {"figures": (ctx.base_info or {}).get("figures", base_figures)}
        if ctx.base_info:
            record["base"].update({k: ctx.base_info.get(k) for k in ("metrics", "groups", "key", "reused",
                                                                    "cache_dir", "latency_ms_per_example")})
        record["compression"] = {"name": cfg.compressor.name, "family": run["family"], "stages": reports}
        record["phases"] = ctx.phases
        if evals["predictions"] is not None:
            buf_path = out_dir / "predictions.npz"
            import io

            buf = io.BytesIO()
            arrays = {k: evals["predictions"][:, i].numpy().astype(np.int32)
                      for i, k in enumerate(("index", "label", "pred"))}
            # the test examples' label/attribute values: groups for significance tests, without a re-run
            arrays.update(prediction_metadata(ctx.datamodule, arrays["index"]))
            np.savez_compressed(buf, **arrays)
            atomic_write_bytes(buf_path, buf.getvalue())
            record["predictions"] = buf_path.name
        record["status"] = "completed"
        return record
    except BaseException as exc:
        record["status"] = "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        record["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": traceback.format_exc(limit=20)}
        raise
    finally:
        if ctx is not None:
            record["phases"] = ctx.phases
            record["timing"] = {**ctx.timing, "total": time.perf_counter() - t_start}
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_results(res_path, record)
        if ctx is not None and record["status"] == "completed":
            log_summary(ctx.loggers, record)  # W&B: family tag, size/accuracy summary, per-group table
        finish_loggers(ctx.loggers if ctx else [])
        if record["status"] == "completed":
            summarize(record)


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


def summarize(record: dict[str, Any]) -> None:
    run = record["run"]
    base = (record.get("base") or {}).get("groups", {}).get("test", {}).get(PRIMARY) if record.get("base") else None
    title = f"test accuracy by group — {run['dataset']} / {run['model']} / {run['compressor']} / seed {run['seed']}"
    print_group_table(title, record["groups"]["test"][PRIMARY], base)
    for name, res in record["groups"]["test"].items():
        if name != PRIMARY:
            console.print(f"  {name}: worst-group {100 * res['acc_wg']:.2f}% over {len(res['acc'])} groups")
    m = record["model"]
    console.print(f"  model: {m['params']:,} params, {m['size_mb']:.2f} MB; "
                  f"results: {Path(record['output_dir']) / RESULTS_FILE}")
