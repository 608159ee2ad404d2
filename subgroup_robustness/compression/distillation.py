"""Task distillation: a smaller student learns from the cached fine-tuned base (the teacher).

Offline there is no public distilled checkpoint, so the student is built here: by default from the
teacher itself, keeping a subset of its layers (DistilBERT's initialisation: every other layer, starting
at the first, so 6 -> 3 keeps [0, 2, 4] and 6 -> 2 keeps [0, 3]), or loaded from a model config that
shares the teacher's tokenizer (e.g. ``student_model=bert_tiny`` when online).

Training is the ordinary Lightning fine-tuning with a loss hook: soft-target KD (Hinton et al.,
KL(teacher || student) at temperature T, scaled by T^2) plus label cross-entropy, optionally TinyBERT's
hidden-state MSE (through a learned projection when the widths differ) and attention MSE. The teacher
stays outside the LightningModule's registry, so it is never optimised, saved, measured or copied by
BestWeights; it runs frozen in eval mode and follows the module to its device.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.figures import model_figures
from subgroup_robustness.models.structure import layer_stack, model_inputs
from subgroup_robustness.utils.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.models.classifier import SequenceClassifier

SELECTIONS = ("alternate", "bottom", "top")


# ---- students built from the teacher ---------------------------------------------------------------
def select_layers(n_teacher: int, num_layers: int | None = None, keep: Sequence[int] | None = None,
                  selection: str = "alternate") -> list[int]:
    """Which teacher layers the student keeps."""
    if keep is not None:
        keep = [int(i) for i in keep]
        if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n_teacher:
            raise ConfigError(f"keep_layers={keep}: give distinct increasing layer indices in 0..{n_teacher - 1}")
        if len(keep) == n_teacher:
            raise ConfigError(f"keep_layers={keep} keeps all {n_teacher} teacher layers: nothing is compressed")
        return keep
    if num_layers is None or not 1 <= int(num_layers) < n_teacher:
        raise ConfigError(f"num_layers={num_layers}: a student of the {n_teacher}-layer teacher needs 1.."
                          f"{n_teacher - 1} layers (e.g. compressor.stages.0.num_layers={max(1, n_teacher // 2)})")
    k = int(num_layers)
    if selection == "alternate":  # DistilBERT: evenly spaced from the first layer
        return [round(i * n_teacher / k) for i in range(k)]
    if selection == "bottom":
        return list(range(k))
    if selection == "top":
        return list(range(n_teacher - k, n_teacher))
    raise ConfigError(f"layer_selection={selection!r}; expected one of {SELECTIONS}")


def student_from_teacher(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of the teacher with only the ``keep`` layers (embeddings, pooler and head copied too)."""
    student = copy.deepcopy(teacher)
    parent, attr, layers = layer_stack(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # cache bookkeeping in transformers 5 attention modules
                module.layer_idx = j
    setattr(parent, attr, kept)
    student.config.num_hidden_layers = len(keep)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's mapping for a student of another depth: student layer i learns teacher layer g(i)."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


# ---- the loss -----------------------------------------------------------------------------------------
def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al.) so its
    gradients keep their scale as T changes."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


class DistillationLoss(nn.Module):
    """The loss hook ``(module, batch, outputs) -> tensor``. Registered on the SequenceClassifier so the
    projections train and move with it; the teacher is held in a plain tuple, out of the registry."""

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, soft_weight: float = 1.0,
                 hidden_weight: float = 0.0, attention_weight: float = 0.0,
                 layer_map: Sequence[int] = (), student_hidden: int = 0, teacher_hidden: int = 0):
        super().__init__()
        if float(temperature) <= 0:
            raise ConfigError(f"temperature={temperature}: the softmax temperature must be > 0 (e.g. 2.0)")
        self._teacher = (teacher,)
        self.temperature, self.soft_weight = float(temperature), float(soft_weight)
        self.hidden_weight, self.attention_weight = float(hidden_weight), float(attention_weight)
        self.layer_map = [int(i) for i in layer_map]
        self.projections = nn.ModuleList()
        if self.hidden_weight and student_hidden != teacher_hidden:  # embeddings + one per student layer
            self.projections = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden)
                                             for _ in range(len(self.layer_map) + 1))
        self.last: dict[str, float] = {}

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _teacher_outputs(self, batch: Mapping[str, torch.Tensor], device: torch.device):
        teacher = self.teacher
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        kwargs = {}
        if self.hidden_weight:
            kwargs["output_hidden_states"] = True
        if self.attention_weight:
            kwargs["output_attentions"] = True
        with torch.no_grad():
            return teacher(**model_inputs(batch), **kwargs)

    def hidden_loss(self, student_hidden, teacher_hidden, mask: torch.Tensor) -> torch.Tensor:
        pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(self.layer_map)]
        m = mask[..., None].float()
        total = student_hidden[0].new_zeros((), dtype=torch.float32)
        for k, (s, t) in enumerate(pairs):
            hs = student_hidden[s].float()
            if len(self.projections):
                hs = self.projections[k](hs)
            diff = (hs - teacher_hidden[t].float()) ** 2 * m
            total = total + diff.sum() / (m.sum() * diff.shape[-1]).clamp_min(1)
        return total / len(pairs)

    def attention_loss(self, student_att, teacher_att, mask: torch.Tensor) -> torch.Tensor:
        m = (mask[:, None, :, None] * mask[:, None, None, :]).float()
        total = student_att[0].new_zeros((), dtype=torch.float32)
        for s, t in enumerate(self.layer_map):
            a_s, a_t = student_att[s].float(), teacher_att[t].float()
            if a_s.shape[1] != a_t.shape[1]:  # different head counts: compare the heads' mean maps
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            diff = (a_s - a_t) ** 2 * m
            total = total + diff.sum() / (m.sum() * diff.shape[1]).clamp_min(1)
        return total / max(1, len(self.layer_map))

    def forward(self, module: nn.Module, batch: Mapping[str, torch.Tensor], outputs) -> torch.Tensor:
        t_out = self._teacher_outputs(batch, outputs.logits.device)
        parts: dict[str, torch.Tensor] = {}
        if self.soft_weight:
            parts["kd_soft"] = soft_target_loss(outputs.logits, t_out.logits, self.temperature)
        mask = batch["attention_mask"]
        if self.hidden_weight:
            if outputs.hidden_states is None:
                raise RuntimeError("hidden-state distillation needs module.output_hidden_states=True")
            parts["kd_hidden"] = self.hidden_loss(outputs.hidden_states, t_out.hidden_states, mask)
        if self.attention_weight:
            if not outputs.attentions or not t_out.attentions:
                raise RuntimeError("attention distillation needs eager attention and module.output_attentions=True")
            parts["kd_attention"] = self.attention_loss(outputs.attentions, t_out.attentions, mask)
        weights = {"kd_soft": self.soft_weight, "kd_hidden": self.hidden_weight,
                   "kd_attention": self.attention_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        if getattr(module, "_trainer", None) is not None:
            module.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, on_step=True, on_epoch=False,
                            batch_size=mask.shape[0])
        return loss


# ---- the compressor ---------------------------------------------------------------------------------
class TaskDistillation(Compressor):
    """Distil the fine-tuned base (teacher) into a smaller student during fine-tuning."""

    name = "distill"
    family = "distillation"
    stage = "during"
    start_from = "finetuned"
    trains = True

    def __init__(self, num_layers: int | None = 3, keep_layers: Sequence[int] | None = None,
                 layer_selection: str = "alternate", student_model: str | Mapping[str, Any] | None = None,
                 temperature: float = 2.0, soft_weight: float = 0.5, ce_weight: float = 0.5,
                 hidden_weight: float = 0.0, attention_weight: float = 0.0):
        if layer_selection not in SELECTIONS:
            raise ConfigError(f"layer_selection={layer_selection!r}; expected one of {SELECTIONS}")
        if min(soft_weight, ce_weight, hidden_weight, attention_weight) < 0:
            raise ConfigError("distillation loss weights must be >= 0")
        if not any((soft_weight, ce_weight, hidden_weight, attention_weight)):
            raise ConfigError("all distillation loss weights are 0: nothing would train the student")
        if float(temperature) <= 0:
            raise ConfigError(f"temperature={temperature}: the softmax temperature must be > 0 (e.g. 2.0)")
        self.num_layers = None if num_layers is None else int(num_layers)
        self.keep_layers = None if keep_layers is None else [int(i) for i in keep_layers]
        self.layer_selection = layer_selection
        self.student_model = student_model if student_model is None or isinstance(student_model, str) \
            else dict(student_model)
        self.temperature = float(temperature)
        self.soft_weight, self.ce_weight = float(soft_weight), float(ce_weight)
        self.hidden_weight, self.attention_weight = float(hidden_weight), float(attention_weight)
        self._report: dict[str, Any] = {}
        self._hook: DistillationLoss | None = None
        self._module = None
        self._attn: str | None = None
        self._layer_map: list[int] = []

    # -- apply: teacher and student
    def apply(self, ctx: CompressionContext) -> Compressed:
        if ctx.base is None:
            raise ConfigError(f"{self.name!r} distils the cached fine-tuned base, but the model it got is not that "
                              "base (it follows another stage in the chain). Put the distillation first.")
        teacher = ctx.model
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        n_teacher = int(teacher.config.num_hidden_layers)
        if self.student_model is None:
            keep = select_layers(n_teacher, self.num_layers, self.keep_layers, self.layer_selection)
            student = student_from_teacher(teacher, keep)
            layer_map = keep
            init = {"init": "teacher_layers", "layers_kept": keep, "layer_selection":
                    "explicit" if self.keep_layers is not None else self.layer_selection}
        else:
            student, model_name = self._load_student(ctx)
            layer_map = uniform_layer_map(int(student.config.num_hidden_layers), n_teacher)
            init = {"init": "model", "model": model_name}
        if self.attention_weight:  # sdpa returns no attention maps
            self._attn = student.config._attn_implementation
            teacher.set_attn_implementation("eager")
            student.set_attn_implementation("eager")
        self._layer_map = layer_map
        base = ctx.base or {}
        self._report = {
            "teacher": {"source": "cached fine-tuned base", "key": base.get("key"),
                        "figures": model_figures(teacher),
                        "test_acc_avg": (base.get("metrics") or {}).get("test", {}).get("test/acc_avg"),
                        "test_acc_wg": (base.get("metrics") or {}).get("test", {}).get("test/acc_wg")},
            "student": {**init, "layers": int(student.config.num_hidden_layers),
                        "hidden_size": int(student.config.hidden_size)},
            "layer_map": layer_map if (self.hidden_weight or self.attention_weight) else None,
            "loss": {"temperature": self.temperature, "soft_weight": self.soft_weight, "ce_weight": self.ce_weight,
                     "hidden_weight": self.hidden_weight, "attention_weight": self.attention_weight},
        }
        if not self.distils:
            self._report["control"] = "cross-entropy only: the same student and initialisation, no distillation loss"
        return Compressed(student, teacher=teacher if self.distils else None)

    def _load_student(self, ctx: CompressionContext):
        from omegaconf import OmegaConf

        from subgroup_robustness.models.loading import load_model

        if isinstance(self.student_model, str):
            try:
                spec = OmegaConf.to_container(ctx.model_config(self.student_model), resolve=True)
            except Exception:  # noqa: BLE001 - hydra's MissingConfigException and friends: one line
                raise ConfigError(f"student_model={self.student_model!r}: there is no conf/model/"
                                  f"{self.student_model}.yaml (model=... names a model config)") from None
        else:
            spec = self.student_model
        names = list(ctx.label_names)
        student, tokenizer = load_model(spec, len(names), names)
        if tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
            raise ConfigError(
                f"student_model {spec.get('name')!r} uses another vocabulary than the teacher; logit distillation "
                "feeds both the same token ids. Pick a student with the teacher's tokenizer, or build one from "
                "the teacher's layers (num_layers=...)."
            )
        return student, spec.get("name")

    # -- the fine-tuning
    @property
    def distils(self) -> bool:
        """False for the cross-entropy-only control (all KD weights 0): the same student, no teacher signal."""
        return bool(self.soft_weight or self.hidden_weight or self.attention_weight)

    def configure_module(self, ctx: CompressionContext, module: "SequenceClassifier") -> None:
        module.ce_weight = self.ce_weight
        if not self.distils:
            return
        student, teacher = ctx.model, ctx.teacher
        hook = DistillationLoss(teacher, self.temperature, self.soft_weight, self.hidden_weight,
                                self.attention_weight, self._layer_map, int(student.config.hidden_size),
                                int(teacher.config.hidden_size))
        module.add_module("distillation", hook)  # projections: optimised, moved, not part of ctx.model
        module.loss_hooks.append(hook)
        module.output_hidden_states = module.output_hidden_states or bool(self.hidden_weight)
        module.output_attentions = module.output_attentions or bool(self.attention_weight)
        self._hook, self._module = hook, module

    def finalize(self, ctx: CompressionContext) -> None:
        """Detach the loss hook (the run drops the teacher); evaluation sees the plain student (fast
        attention again)."""
        module, hook = self._module, self._hook
        if module is not None and hook is not None:
            module.loss_hooks.remove(hook)
            del module.distillation
            module.ce_weight = 1.0
            module.output_hidden_states = module.output_attentions = False
        if self._attn is not None:
            ctx.model.set_attn_implementation(self._attn)
        self._hook = self._module = None

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        return dict(self._report)
