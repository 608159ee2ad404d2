"""The LightningModule: a Hugging Face sequence classifier trained with AdamW + linear schedule.

Compressors that change training (distillation, QAT) attach ``loss_hooks`` instead of writing their own
loop, so Lightning stays the only training loop.

Multi-label datasets (``dataset.task: multilabel``, e.g. ECtHR): the batch's ``labels`` are label-set
bitmasks; the module trains with BCE-with-logits on their multi-hot decoding and predicts the labels whose
sigmoid exceeds 0.5, returned as a bitmask again. The task is ``task`` when given, else the attached
datamodule's (read in ``setup``)."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from subgroup_robustness.models.objectives import ERM, Objective
from subgroup_robustness.models.structure import model_inputs
from subgroup_robustness.utils.errors import ConfigError

SINGLE_LABEL, MULTILABEL = "single_label", "multilabel"
TASKS = (SINGLE_LABEL, MULTILABEL)
THRESHOLD = 0.5  # multi-label: a label is predicted when its sigmoid exceeds this (FairLex's rule)


def multi_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(B,) label-set bitmasks -> (B, C) float multi-hot targets (bit k = label k)."""
    shifts = torch.arange(num_labels, device=labels.device)
    return ((labels.long().unsqueeze(-1) >> shifts) & 1).float()


def label_sets(logits: torch.Tensor, threshold: float = THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label predictions of (B, C) logits: (bitmasks (B,), sigmoid probabilities (B, C))."""
    probs = logits.float().sigmoid()
    shifts = torch.arange(logits.shape[-1], device=logits.device)
    return ((probs > threshold).long() << shifts).sum(-1), probs


def compile_failure(exc: BaseException) -> str | None:
    """One line naming a torch.compile failure (dynamo, AOTAutograd or inductor), None for any other error
    (a bad batch, an out-of-memory), which must surface as itself."""
    names = {cls.__module__.split(".")[1] if cls.__module__.startswith("torch.") else "" for cls in type(exc).__mro__}
    if not names & {"_dynamo", "_inductor", "_functorch"}:
        return None
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


class SequenceClassifier(L.LightningModule):
    def __init__(self, model: nn.Module, objective: Objective | None = None, lr: float = 2e-5,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.0, adam_eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), fused_adamw: bool = True,
                 scheduler: str = "linear", compile: bool = False, task: str | None = None):
        super().__init__()
        self.model = model
        self.objective = objective if objective is not None else ERM()
        if task is not None and task not in TASKS:
            raise ConfigError(f"module.task={task!r}; choose one of {list(TASKS)} (null = the dataset's task)")
        self.task = task
        self.lr, self.weight_decay, self.warmup_ratio = float(lr), float(weight_decay), float(warmup_ratio)
        self.adam_eps, self.betas, self.fused_adamw = float(adam_eps), tuple(betas), bool(fused_adamw)
        self.scheduler_name = scheduler
        # (module, batch, outputs) -> extra loss term; set by compressors such as distillation
        self.loss_hooks: list[Callable[[Any, dict, Any], torch.Tensor]] = []
        self.ce_weight = 1.0
        self.output_hidden_states = False
        self.output_attentions = False
        # torch.compile of the training forward only: evaluation stays eager (no second compile for
        # inference mode, and quantized models are never traced)
        self.compile_model = bool(compile)
        self._compiled: tuple[nn.Module, Callable] | None = None

    def forward(self, batch: dict[str, torch.Tensor], **kwargs):
        return self.model(**model_inputs(batch), **kwargs)

    # ---- the task (single-label or multi-label) -----------------------------------------------------
    @property
    def multilabel(self) -> bool:
        return self.task == MULTILABEL

    def setup(self, stage: str) -> None:
        """Adopt the datamodule's task (``dataset.task``) unless one was given; a disagreement is refused."""
        cfg = getattr(getattr(self._trainer, "datamodule", None), "cfg", None) if self._trainer is not None else None
        data_task = (cfg or {}).get("task", SINGLE_LABEL) if isinstance(cfg, dict) else None
        if data_task is not None:
            if self.task is None:
                self.task = data_task
            elif self.task != data_task:
                raise ConfigError(f"module.task={self.task!r} but dataset {cfg.get('name')!r} is {data_task!r}; "
                                  "drop module.task (the dataset's task is used)")
        if self.multilabel and not (type(self.objective) is ERM):
            raise ConfigError(f"objective {getattr(self.objective, 'name', self.objective)!r} is single-label; "
                              "a multi-label dataset trains with BCE-with-logits only (objective=erm)")

    def _supervised_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), multi_hot(batch["labels"], logits.shape[-1]))
        return self.objective(logits, batch["labels"], batch["metadata"])

    def _train_forward(self, batch: dict[str, torch.Tensor], **kwargs):
        if not self.compile_model:
            return self(batch, **kwargs)
        if self._compiled is None or self._compiled[0] is not self.model:
            # dynamic: bucketed batches change the sequence length every step; one graph serves them all.
            # A tuple is not registered as a submodule, so state_dict keys stay those of the plain model.
            self._compiled = (self.model, torch.compile(self.model, dynamic=True))
        try:
            return self._compiled[1](**model_inputs(batch), **kwargs)
        except Exception as exc:  # noqa: BLE001 - compilation failures only (see compile_failure)
            why = compile_failure(exc)
            if why is None:
                raise
        # a model torch.compile cannot trace or a backend that fails here: train eagerly, say so in one line
        from subgroup_robustness.utils.console import console

        console.print(f"[yellow]module.compile: torch.compile failed ({why}); training eagerly[/yellow]",
                      soft_wrap=True)
        self.compile_model, self._compiled = False, None
        return self(batch, **kwargs)

    def training_step(self, batch, batch_idx):
        kwargs = {}
        if self.output_hidden_states:
            kwargs["output_hidden_states"] = True
        if self.output_attentions:
            kwargs["output_attentions"] = True
        outputs = self._train_forward(batch, **kwargs)
        loss = self.ce_weight * self._supervised_loss(outputs.logits, batch) \
            if self.ce_weight else outputs.logits.new_zeros(())
        for hook in self.loss_hooks:
            loss = loss + hook(self, batch, outputs)
        if self._logged_step():
            # the progress bar turns its values into Python floats every step: free on CPU, but on a GPU
            # that would wait for the step to finish each time, so there only the logger gets the loss
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=loss.device.type == "cpu",
                     batch_size=batch["labels"].shape[0])
        return loss

    def _logged_step(self) -> bool:
        """Lightning's loggers read step values every ``log_every_n_steps`` steps; a ``self.log`` call on the
        steps in between is never read and costs ~1 ms of bookkeeping (measured in benchmarks/)."""
        n = getattr(self._trainer, "log_every_n_steps", 1) if self._trainer is not None else 1
        return n <= 1 or (self.global_step + 1) % n == 0

    def on_train_epoch_end(self):
        values = self.objective.epoch_log() if hasattr(self.objective, "epoch_log") else {}
        if values:  # e.g. group DRO's weights, train/dro_q/<group>
            self.log_dict(values, on_step=False, on_epoch=True)

    def _eval_step(self, batch):
        logits = self(batch).logits
        if self.multilabel:  # preds: label-set bitmasks; probs: per-label sigmoids
            preds, probs = label_sets(logits)
            return {"preds": preds, "probs": probs}
        return {"preds": logits.argmax(-1), "probs": logits.float().softmax(-1)}

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def predict_step(self, batch, batch_idx):
        return self(batch).logits

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning refuses to clip for fused AdamW under autocast; with bf16 there is no loss scaler,
        so clipping the gradients directly is exact (fp16 falls back to unfused AdamW instead)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None],
                                           float(gradient_clip_val))
        else:
            torch.nn.utils.clip_grad_value_([p for p in self.parameters() if p.grad is not None],
                                            float(gradient_clip_val))

    def _use_fused(self, groups) -> bool:
        precision = str(getattr(getattr(self, "_trainer", None), "precision", "32-true") or "")
        return (self.fused_adamw and "16-mixed" != precision
                and all(p.dtype.is_floating_point for g in groups for p in g["params"]))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "bias" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kwargs: dict[str, Any] = {"lr": self.lr, "eps": self.adam_eps, "betas": self.betas}
        if self._use_fused(groups):
            kwargs["fused"] = True  # one kernel for all params: ~5x faster optimizer step on CPU
        optimizer = torch.optim.AdamW(groups, **kwargs)
        if self.scheduler_name == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def linear(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
