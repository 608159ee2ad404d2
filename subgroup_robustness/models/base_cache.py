"""The fine-tuned base, cached: post-training compressors of one (dataset, model, seed, training
settings) start from the same fine-tuned weights, so a grid fine-tunes each base once.

An entry is written to a temporary folder and renamed into place only when complete; a half-written
entry is never used. A file lock keeps parallel jobs from training the same base twice."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from subgroup_robustness.utils.io import atomic_write_json, file_lock, read_json, stable_hash

MARKER = "base.json"


class BaseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.entry(key) / MARKER).exists()

    def load(self, key: str):
        from transformers import AutoTokenizer

        from subgroup_robustness.compression.pruning import load_pruned

        folder = self.entry(key)
        model = load_pruned(folder)  # from_pretrained, or the recorded head-pruned shape first
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model, tokenizer, read_json(folder / MARKER)

    def save(self, key: str, model, tokenizer, info: dict[str, Any]) -> Path:
        final = self.entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MARKER, info)  # the marker is written last
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def get_or_train(self, key: str, train: Callable[[], tuple[Any, Any, dict[str, Any]]]):
        """(model, tokenizer, info, reused?) — trains and stores under a lock when missing."""
        with file_lock(self.root / f".{key}.lock"):
            if self.has(key):
                model, tokenizer, info = self.load(key)
                return model, tokenizer, info, True
            model, tokenizer, info = train()
            self.save(key, model, tokenizer, info)
            return model, tokenizer, info, False


def base_key(cfg) -> str:
    """Everything that changes the fine-tuned base, and nothing else (not paths, loggers, compressor)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    trainer = {k: v for k, v in c.get("trainer", {}).items()
               if k in ("max_epochs", "max_steps", "min_epochs", "precision", "gradient_clip_val",
                        "accumulate_grad_batches", "limit_train_batches", "limit_val_batches",
                        "val_check_interval", "check_val_every_n_epoch")}
    payload = {
        "dataset": c["dataset"], "model": c["model"], "seed": c["seed"], "module": c["module"],
        "data": {k: v for k, v in c["data"].items() if k not in ("dataset", "cache_dir", "num_workers")},
        "objective": c.get("objective"), "monitor": c.get("monitor"), "trainer": trainer,
        "callbacks": {k: v for k, v in (c.get("callbacks") or {}).items() if "progress" not in k},
    }
    name = f"{c['dataset']['name']}-{c['model']['name']}-s{c['seed']}"
    return f"{name}-{stable_hash(payload, 12)}"
