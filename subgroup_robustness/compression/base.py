"""The compressor interface.

Glossary. A *setting* is one row of the study (``pr40``, ``vt50+dq``, ``bert_medium``); its
``compressor`` config names a *family* and lists *stages*; a chain's stages come from its *members*
(each an ordinary compressor config); each stage is one ``Compressor`` object. A fine-tuning is a
*phase* in results.json.

A compressor declares *when* it acts:
- ``before``: changes the pretrained model before fine-tuning (vocabulary transfer, student construction);
- ``during``: changes how fine-tuning runs (quantization-aware training, distillation losses);
- ``after``: acts on the fine-tuned model (head pruning + re-fine-tuning, post-training quantization).

The experiment runs stages in that order. Each stage's ``apply(ctx)`` receives a
:class:`~subgroup_robustness.compression.context.CompressionContext` and returns a
:class:`~subgroup_robustness.compression.context.Compressed` (the new model, and the tokenizer or teacher
when it changed them); if ``trains`` is set the experiment then fine-tunes (with ``configure_module``
hooks attached) and calls ``finalize``, which may return another ``Compressed`` (e.g. QAT's conversion).
``start_from`` says whether the first stage wants the pretrained model or the cached fine-tuned base of the
same dataset/model/seed. Arguments are checked in ``__init__``, which the experiment runs when the chain
is built, before any model is loaded or trained. Size, parameters, dtypes and CPU latency are measured by
the experiment before and after every stage (``models/figures.py``); ``report`` adds only what is
specific to the method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from subgroup_robustness.compression.context import CompressionContext, Compressed

if TYPE_CHECKING:  # pragma: no cover
    from subgroup_robustness.models.classifier import SequenceClassifier

STAGES = ("before", "during", "after")


class Compressor:
    name: ClassVar[str] = "compressor"       # the method's name in phase names and reports
    family: ClassVar[str] = "none"
    stage: ClassVar[str] = "after"
    start_from: ClassVar[str] = "finetuned"  # or "pretrained"
    trains: ClassVar[bool] = False           # fine-tune after apply()
    quantizes: ClassVar[bool] = False        # the result has int8 weights: nothing may train after it
    eval_on_cpu: ClassVar[bool] = False      # quantized kernels run on CPU (as in the paper)
    fit_precision: str | None = None          # the fine-tuning after this stage must run in this precision

    def apply(self, ctx: CompressionContext) -> Compressed:
        """The compressed model (default: the model unchanged)."""
        return Compressed(ctx.model)

    def configure_module(self, ctx: CompressionContext, module: "SequenceClassifier") -> None:
        """Attach loss hooks or flags before the fine-tuning that follows ``apply`` (default: nothing)."""

    def finalize(self, ctx: CompressionContext) -> Compressed | None:
        """After that fine-tuning; return a ``Compressed`` when the model changes again (default: None)."""
        return None

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        """Method-specific figures for results.json (heads kept, sparsity, vocabulary size, ...)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"
