"""What a compressor may see and what it gives back: the plug-in's whole contract with the run.

A compressor never imports the experiment. It receives a :class:`CompressionContext` (the model it acts
on, its tokenizer, the data module's read-only views, a work folder, the seed, the model spec, and a
trainer factory for compressors that train something of their own, e.g. masked-LM adaptation) and
returns a :class:`Compressed` naming what it changed. The experiment owns every assignment: it swaps the
model, re-tokenises the data when the tokenizer changed, and keeps the teacher for the fine-tuning that
follows. This is TextPruner's "a pruner receives a model and batches" applied to a chain of stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from torch import nn


@runtime_checkable
class DataView(Protocol):
    """The read-only side of the data module a compressor may use (``GroupDataModule`` satisfies it)."""

    def texts(self, split: str = "train") -> list[str]: ...

    def train_dataloader(self) -> Iterable[dict]: ...

    def val_dataloader(self) -> Iterable[dict]: ...

    def test_dataloader(self) -> Iterable[dict]: ...

    @property
    def max_length(self) -> int: ...


@runtime_checkable
class CompressionContext(Protocol):
    """What ``Compressor.apply`` / ``configure_module`` / ``finalize`` / ``report`` receive.

    - ``model``, ``tokenizer``: the model as the previous stage left it (the cached fine-tuned base or the
      pretrained model for the first stage) and its tokenizer;
    - ``teacher``: the model a 'during' stage distils from, while that fine-tuning lasts (else None);
    - ``base``: the cached fine-tuned base's record (key, figures, metrics) when the run started from it,
      else None;
    - ``data``: the data module, read only; ``workdir``: the run's folder, for files a stage writes;
    - ``seed``, ``model_spec`` (the resolved ``model`` config), ``label_names``;
    - ``make_trainer(**overrides)``: a Lightning Trainer built from the run's trainer config (no loggers,
      no checkpoints), for training a compressor does on its own;
    - ``model_config(name)``: the resolved ``conf/model/<name>.yaml`` through Hydra (search path included).
    """

    model: nn.Module
    tokenizer: Any
    teacher: nn.Module | None
    base: Mapping[str, Any] | None
    data: DataView
    workdir: Path
    seed: int
    model_spec: Mapping[str, Any]
    label_names: Sequence[str]

    def make_trainer(self, **overrides: Any) -> Any: ...

    def model_config(self, name: str) -> Mapping[str, Any]: ...


@dataclass
class Compressed:
    """What a stage changed. ``tokenizer=None`` keeps the current one; ``teacher`` (None: unchanged) is held
    by the run for the fine-tuning right after this stage and dropped after it."""

    model: nn.Module
    tokenizer: Any = None
    teacher: nn.Module | None = None


@dataclass
class SimpleContext:
    """A plain CompressionContext for calling a compressor outside a run (tests, notebooks, scripts)."""

    model: nn.Module
    tokenizer: Any = None
    teacher: nn.Module | None = None
    base: Mapping[str, Any] | None = None
    data: Any = None
    workdir: Path = Path(".")
    seed: int = 0
    model_spec: Mapping[str, Any] = None  # type: ignore[assignment]
    label_names: Sequence[str] = ()

    def make_trainer(self, **overrides: Any):
        import lightning.pytorch as L

        kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False)
        kwargs.update(overrides)
        return L.Trainer(**kwargs)

    def model_config(self, name: str) -> Mapping[str, Any]:
        from subgroup_robustness.utils.compose import compose_group

        return compose_group("model", name)

    def update(self, result: "Compressed | None") -> "SimpleContext":
        """Take a stage's result, as the experiment does (tests chain stages by hand with it)."""
        if result is not None:
            self.model = result.model
            if result.tokenizer is not None:
                self.tokenizer = result.tokenizer
            if result.teacher is not None:
                self.teacher = result.teacher
        return self
