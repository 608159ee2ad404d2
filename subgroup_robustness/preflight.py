"""Errors before work: everything that can be checked without a model or data is checked here, before the
config tree is printed and before anything is loaded or trained — the dataset spec, the compressor chain
and every stage's arguments, the types and ranges of the common knobs, and whether the output and cache
folders are writable. Each problem is one line that names the key and the fix; a relaunch after the fix
loses nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.chain import expand_chain
from subgroup_robustness.utils.errors import ConfigError


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as exc:  # noqa: BLE001 - an interpolation that cannot resolve: one line
        raise ConfigError(f"{key}: cannot be resolved ({str(exc).splitlines()[0]}); check the config or the "
                          "override that sets it") from None


def _integer(cfg: DictConfig, key: str, minimum: int, example: str, allow: tuple = ()) -> None:
    value = _value(cfg, key)
    if value is None or value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} is not an integer; e.g. {example}")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}; e.g. {example}")


def _writable(folder: str | os.PathLike, key: str) -> None:
    path = Path(folder)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable (no write permission on {probe}); point {key} at a "
                          "folder you can write, e.g. " + ("paths.cache_dir=$HOME/.cache/subgroup_robustness"
                                                           if "cache" in key else "hydra.run.dir=./outputs/run"))


def _check_tokenizer_kind(cfg: DictConfig, stages: list[Compressor]) -> None:
    """Vocabulary transfer learns a WordPiece vocabulary: a model whose config says its tokenizer is another
    kind (``model.tokenizer_model: unigram``, the SentencePiece models) is refused before anything loads."""
    kind = str((cfg.get("model") or {}).get("tokenizer_model") or "wordpiece")
    if kind != "wordpiece" and any(getattr(s, "family", None) == "vocabulary" and not getattr(s, "keep_tokenizer", False)
                                   for s in stages):
        raise ConfigError(
            f"vocabulary transfer learns a WordPiece vocabulary, but model {cfg.model.get('name')!r} has a "
            f"{kind} (SentencePiece) tokenizer; use a WordPiece model (model=mbert, bert_base, minilm_l6) or "
            "another compressor")


def check_config(cfg: DictConfig) -> list[Compressor]:
    """Complete and check the run's config in place (a chain is expanded into its members' stages) and
    return the built stages. Raises ConfigError (one line) for the first problem found."""
    from subgroup_robustness.data.spec import validate_dataset_spec
    from subgroup_robustness.experiment import build_stages

    if cfg.get("dataset") is None:
        raise ConfigError("no dataset selected; add dataset=<name>, e.g. dataset=redditbias")
    validate_dataset_spec(cfg.dataset)
    _integer(cfg, "seed", 0, "seed=1")
    _integer(cfg, "data.batch_size", 1, "dataset.train.batch_size=16")
    _integer(cfg, "data.eval_batch_size", 1, "data.eval_batch_size=64")
    _integer(cfg, "trainer.max_epochs", 1, "trainer.max_epochs=3", allow=(-1,))
    lr = _value(cfg, "module.lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ConfigError(f"module.lr={lr!r} must be a positive number; e.g. dataset.train.lr=2e-5")
    expand_chain(cfg)
    stages = build_stages(cfg.compressor)
    _check_tokenizer_kind(cfg, stages)
    from subgroup_robustness.evaluation import eval_entries

    eval_entries(cfg)  # eval_datasets: names or {dataset: ...}, no duplicates (one line otherwise)
    for key in ("paths.output_dir", "paths.cache_dir"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            _writable(_value(cfg, key), key)
    return stages
