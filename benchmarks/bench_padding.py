"""Padding strategies on real lengths: fixed 128 tokens, dynamic (random batches padded to their
longest), length-bucketed (the framework's BucketBatchSampler: shuffled pools sorted by length).

For RedditBias (the offline default) and MultiNLI (dev_matched premise + hypothesis, when the file is
there): padding over one whole epoch, and measured training throughput of the framework's step on the
batches each strategy makes, side by side in one process.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch

from common import MULTINLI, StepClock, compose, cycle, framework, main, plain_train, throughput, train_flops

MNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def multinli_split(tokenizer, max_length: int, limit: int | None = None):
    """dev_matched pairs (official fields or the renamed premise/hypothesis/label copy) as the
    framework's TokenizedSplit, label in the metadata's first column."""
    from subgroup_robustness.data.datamodule import TokenizedSplit

    rows = []
    with open(MULTINLI, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            label = r.get("label", r.get("gold_label"))
            if label in MNLI_LABELS:
                rows.append((r.get("premise", r.get("sentence1")), r.get("hypothesis", r.get("sentence2")), label))
    rows = rows[:limit] if limit else rows
    enc = tokenizer([r[0] for r in rows], [r[1] for r in rows], truncation=True,
                    max_length=max_length, return_attention_mask=False, return_token_type_ids=True)
    lens = [len(x) for x in enc["input_ids"]]
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.long)
    ids = torch.as_tensor(np.concatenate(enc["input_ids"]), dtype=torch.int32)
    tts = torch.as_tensor(np.concatenate(enc["token_type_ids"]), dtype=torch.int8)
    labels = torch.as_tensor([MNLI_LABELS[r[2]] for r in rows], dtype=torch.long)
    return TokenizedSplit(ids, offsets, tts, labels[:, None], torch.arange(len(rows)))


class FixedCollator:
    """Every batch padded to ``length`` tokens, the naive choice."""

    def __init__(self, inner, length: int, pad_id: int):
        self.inner, self.length, self.pad_id = inner, length, pad_id

    def __call__(self, items):
        batch = self.inner(items)
        extra = self.length - batch["input_ids"].shape[1]
        if extra > 0:
            for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
                if key in batch:
                    batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        return batch


def loader_factory(split, strategy: str, batch_size: int, seed: int, pad_id: int, max_length: int):
    from torch.utils.data import DataLoader

    from subgroup_robustness.data.datamodule import BucketBatchSampler, Collator

    collate = Collator(pad_id)
    if strategy == "fixed 128":
        collate = FixedCollator(collate, max_length, pad_id)
    sampler = BucketBatchSampler(split.lengths, batch_size, shuffle=True, seed=seed, bucket=strategy == "bucketed")
    return lambda: DataLoader(split, batch_sampler=sampler, collate_fn=collate)


def epoch_padding(split, strategy: str, batch_size: int, seed: int, max_length: int, model) -> dict[str, float]:
    """Exact padding statistics of one epoch of this strategy (no model run)."""
    from subgroup_robustness.data.datamodule import BucketBatchSampler

    lengths = split.lengths
    sampler = BucketBatchSampler(lengths, batch_size, shuffle=True, seed=seed, bucket=strategy == "bucketed")
    padded = real = flops = 0
    for b in sampler:
        t = max_length if strategy == "fixed 128" else int(lengths[b].max())
        padded += t * len(b)
        real += int(lengths[b].sum())
        flops += train_flops(model, len(b), t)
    return {"mean_T": padded / len(lengths), "pad_frac": 1 - real / padded, "gflop_per_ex": flops / len(lengths) / 1e9}


def run(quick: bool = False) -> dict:
    warmup, windows, window = (1, 1, 2) if quick else (2, 2, 8)
    cfg = compose(["callbacks.early_stopping=null"])
    ctx = framework(cfg)
    tok = ctx.tokenizer
    max_length = int(cfg.dataset.max_length)
    corpora = {"RedditBias train": (ctx.data.splits["train"], ctx.model)}
    notes = []
    if MULTINLI.exists():
        from subgroup_robustness.models.loading import load_model

        mnli_model, _ = load_model(cfg.model, 3)
        corpora["MultiNLI dev_matched"] = (multinli_split(tok, max_length), mnli_model)
    else:
        notes.append(f"MultiNLI skipped: {MULTINLI} not found")
    precision = str(cfg.trainer.precision)
    bs, seed = int(cfg.data.batch_size), int(cfg.seed)
    rows = []
    for corpus, (split, model) in corpora.items():
        lengths = split.lengths
        for strategy in ("fixed 128", "dynamic", "bucketed"):
            pad = epoch_padding(split, strategy, bs, seed, max_length, model)
            clock = StepClock(warmup, windows, window)
            batches = cycle(loader_factory(split, strategy, bs, seed, tok.pad_token_id or 0, max_length))
            plain_train(copy.deepcopy(model), batches, clock, precision=precision, lr=float(cfg.module.lr))
            stats = clock.window_stats()
            rate = throughput(stats)
            rows.append({"corpus": corpus, "mean tokens": float(lengths.mean()), "strategy": strategy,
                         "padded T (epoch)": pad["mean_T"], "padding (epoch)": pad["pad_frac"],
                         "train GFLOP/example": pad["gflop_per_ex"], "examples/s": rate,
                         "padded T (timed)": sum(s["tokens"] for s in stats) / max(1, sum(s["examples"] for s in stats))})
            print(f"{corpus} / {strategy}: {rate:.1f} examples/s", flush=True)
    for corpus in corpora:
        part = {r["strategy"]: r for r in rows if r["corpus"] == corpus}
        for r in part.values():
            r["vs fixed 128"] = r["examples/s"] / part["fixed 128"]["examples/s"]
        notes.append(f"{corpus}: bucketed / dynamic = {part['bucketed']['examples/s'] / part['dynamic']['examples/s']:.2f}x, "
                     f"bucketed / fixed 128 = {part['bucketed']['vs fixed 128']:.1f}x")
    notes.append(f"the framework's training step ({precision}, fused AdamW), batch {bs}; {windows} windows x {window} "
                 f"steps after {warmup} warm-up per strategy; 'padded T (timed)' is the mean padded length of the "
                 "timed batches, '(epoch)' that of a whole epoch")
    return {"title": "Padding strategies (training throughput on real lengths)", "tables": [{"rows": rows}],
            "notes": notes, "summary": {f"{r['corpus']}|{r['strategy']}": r["examples/s"] for r in rows}}


if __name__ == "__main__":
    main("padding", run)
