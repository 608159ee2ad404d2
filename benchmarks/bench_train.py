"""Training throughput of the framework's Lightning path against the HF Trainer and a plain loop.

All contenders fine-tune the same model (the composed default: MiniLM-L6 on RedditBias, batch 32,
lr 2e-5) in one process, interleaved in rounds so that load from other processes hits them alike:
- framework: SequenceClassifier + GroupDataModule + the Lightning Trainer, built from the config with
  its callbacks and logger, as ``make run`` builds them;
- plain loop: the same batches and the same step (autocast, fused AdamW, clipping, schedule), no
  Lightning: the difference is the framework's own overhead (in one process it moves with the heap
  state; bench_overhead.py measures it across fresh processes);
- HF Trainer: transformers ``Trainer`` + ``DataCollatorWithPadding`` with its defaults (random batches,
  fp32), as the paper's code ran it; the Trainer with bf16 and length grouping; and the tuned Trainer (bf16,
  length grouping, its fused AdamW ``optim=adamw_torch_fused`` and ``torch_compile=True``), the peer a careful
  user has. Compiled contenders are timed after their warm-up steps (the compile is reported by bench_compile).
  The Trainer's bf16 is on only where the CPU runs bf16 natively, the same rule as the framework's
  ``trainer.precision=auto`` (common.native_bf16); elsewhere every contender trains in fp32.
"""

from __future__ import annotations

import copy
import gc
import tempfile

import torch

from common import (NO_BF16, StepClock, compose, framework, lightning_clock, main, median, native_bf16,
                    plain_train, spread, throughput)
from subgroup_robustness.utils.perf import keep_freed_memory


def run_framework(ctx, base, clock: StepClock, trainer_overrides: dict | None = None, **module_overrides) -> None:
    from hydra.utils import instantiate

    ctx.model = copy.deepcopy(base)
    ctx.model.train()
    module = instantiate(ctx.cfg.module, **module_overrides)(model=ctx.model, objective=instantiate(ctx.cfg.objective))
    trainer = ctx.trainer(training=True, max_steps=clock.steps, **(trainer_overrides or {}))
    trainer.callbacks.append(lightning_clock(clock))
    trainer.fit(module, datamodule=ctx.data)


def run_plain(ctx, base, clock: StepClock) -> dict:
    model = copy.deepcopy(base)
    cfg = ctx.cfg
    return plain_train(model, iter(ctx.data.train_dataloader()), clock, precision=str(cfg.trainer.precision),
                       lr=float(cfg.module.lr), weight_decay=float(cfg.module.weight_decay),
                       clip=cfg.trainer.get("gradient_clip_val"), fused=bool(cfg.module.fused_adamw))


class TokenizedItems:
    """The framework's tokenized train split as the list-of-dicts dataset the HF Trainer expects."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        item = self.split[i]
        return {"input_ids": item["input_ids"].tolist(), "labels": int(item["metadata"][0])}


# the HF Trainer's tuned contenders use bf16 exactly where the framework's auto precision does: on a CPU
# without native bf16 a careful user keeps fp32 (emulated bf16 would make the tuned peer ~50x slower)
BF16 = native_bf16()
TUNED_PRECISION = "bf16" if BF16 else "fp32"


def run_hf(ctx, base, clock: StepClock, tuned: bool = False, best: bool = False) -> None:
    """``tuned``: bf16 (where native) + length grouping; ``best``: also the Trainer's fused AdamW and its
    ``torch_compile`` (the best a careful user gets from the HF Trainer on this machine)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    cfg = ctx.cfg
    shapes: list[tuple[int, int]] = []
    collate = DataCollatorWithPadding(ctx.tokenizer)

    def collator(features):
        batch = collate(features)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(shapes[state.global_step - 1])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=int(cfg.data.batch_size), learning_rate=float(cfg.module.lr),
            weight_decay=float(cfg.module.weight_decay), max_steps=clock.steps, lr_scheduler_type="linear",
            max_grad_norm=float(cfg.trainer.gradient_clip_val or 0.0), logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=not _cuda(), disable_tqdm=True, seed=int(ctx.data.seed), dataloader_num_workers=0,
            bf16=(tuned or best) and BF16, **(_length_grouping(TrainingArguments) if tuned or best else {}),
            **({"optim": "adamw_torch_fused", "torch_compile": True} if best else {}),
        )
        trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=TokenizedItems(ctx.data.splits["train"]),
                          data_collator=collator, callbacks=[Clock()])
        trainer.train()


def _length_grouping(args_cls) -> dict:
    """Newer transformers releases spell it train_sampling_strategy, older ones group_by_length."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names else {"group_by_length": True}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _allocator(keep: bool, fn):
    """Run ``fn`` with the framework's allocator setting on (as in a run) or glibc's defaults (as a plain
    ``python train.py`` with the HF Trainer gets)."""
    def wrapped(*args):
        keep_freed_memory(keep)
        return fn(*args)

    return wrapped


CONTENDERS = {
    "framework (Lightning)": _allocator(True, lambda ctx, base, clock: run_framework(ctx, base, clock)),
    "plain loop, same batches": _allocator(True, run_plain),
    "HF Trainer (defaults)": _allocator(False, lambda ctx, base, clock: run_hf(ctx, base, clock)),
    f"HF Trainer + {TUNED_PRECISION} + group_by_length + allocator setting": _allocator(
        True, lambda ctx, base, clock: run_hf(ctx, base, clock, tuned=True)),
    "HF Trainer tuned: + fused AdamW + torch_compile": _allocator(
        True, lambda ctx, base, clock: run_hf(ctx, base, clock, best=True)),
}


def run(quick: bool = False, rounds: str | None = None, overrides: str = "", only: str = "",
        steps: str = "") -> dict:
    """``only``: indices of CONTENDERS to run (e.g. 0,1); ``steps``: warmup,windows,window."""
    rounds_n = int(rounds or (1 if quick else 4))
    warmup, windows, window = (1, 1, 2) if quick else (4, 2, 12)
    if steps:
        warmup, windows, window = (int(x) for x in steps.split(","))
    names = [n for i, n in enumerate(CONTENDERS) if not only or str(i) in only.split(",")]
    # early stopping has no per-step hook; it would only complain that the timed steps end before validation
    cfg = compose(["callbacks.early_stopping=null", *[o for o in overrides.split(",") if o]])
    ctx = framework(cfg)
    base = copy.deepcopy(ctx.model)
    rates: dict[str, list[float]] = {k: [] for k in names}
    tokens: dict[str, list[float]] = {k: [] for k in names}
    data_share = []
    steps_by: dict[str, list[list[float]]] = {k: [] for k in names}
    seed = int(cfg.seed)
    if not quick:
        # whichever contender runs first in the process pays one-time costs (lazy initialisation, first-use
        # kernels, heap growth) that have nothing to do with its code: one short untimed pass of each first
        for name in names:
            CONTENDERS[name](ctx, base, StepClock(2, 1, 2))
    for r in range(rounds_n):
        ctx.data.seed = seed + r  # each round times other batches; within a round all see the same data
        # every other round runs the contenders in reverse order: whatever the previous contender leaves
        # behind (allocator state, caches) then favours each side equally often
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = CONTENDERS[name]
            clock = StepClock(warmup, windows, window)
            extra = fn(ctx, base, clock)
            stats = clock.window_stats()
            rates[name].append(throughput(stats))
            steps_by[name].append(clock.step_seconds())
            tokens[name].append(sum(s["tokens"] for s in stats) / max(1, sum(s["examples"] for s in stats)))
            if isinstance(extra, dict) and "data_s" in extra:
                data_share.append(extra["data_s"] / max(1e-9, sum(s["seconds"] for s in stats)) *
                                  windows * window / clock.steps)
            print(f"round {r + 1}/{rounds_n} {name}: {rates[name][-1]:.1f} examples/s", flush=True)
            gc.collect()
    keys = list(CONTENDERS)
    fw, plain, hf = (median(rates.get(k, [])) for k in keys[:3])

    def ratio(a: str, b: str) -> float:
        """Median over rounds of the within-round ratio: load that changes between rounds cancels."""
        if a not in rates or b not in rates:
            return float("nan")
        return median([x / y for x, y in zip(rates[a], rates[b])])

    speedup, rel_plain = ratio(keys[0], keys[2]), ratio(keys[0], keys[1])
    vs_tuned = ratio(keys[0], keys[4])  # the tuned HF Trainer (bf16 where native, length grouping, fused AdamW, compile)
    # the framework and the plain loop run the same batches in the same order: step k of one against step
    # k of the other, over all rounds. Another process stealing the CPU lengthens single steps, so the
    # median of these paired ratios is far steadier than a ratio of window totals.
    paired = [f / p for fr, pr in zip(steps_by.get(keys[0], []), steps_by.get(keys[1], []))
              for f, p in zip(fr, pr)]
    step_overhead = median(paired) - 1 if paired else float("nan")
    extra_ms = median([1000 * (f - p) for fr, pr in zip(steps_by.get(keys[0], []), steps_by.get(keys[1], []))
                       for f, p in zip(fr, pr)]) if paired else float("nan")
    rows = []
    for name in names:
        m = median(rates[name])
        rows.append({"contender": name, "examples/s (median)": m, "rounds": " / ".join(f"{x:.0f}" for x in rates[name]),
                     "spread": spread(rates[name]), "padded tokens/example": median(tokens[name]),
                     "vs HF Trainer": ratio(name, keys[2])})
    summary = {"framework_ex_s": fw, "plain_ex_s": plain, "hf_ex_s": hf, "speedup_vs_hf": speedup,
               "tuned_hf_ex_s": median(rates.get(keys[4], [])), "speedup_vs_tuned_hf": vs_tuned,
               "overhead_vs_plain": 1 - rel_plain, "step_overhead": step_overhead, "extra_ms_per_step": extra_ms,
               "precision": str(cfg.trainer.precision), "tuned_hf_precision": TUNED_PRECISION,
               "threads": torch.get_num_threads(), "rates": rates}
    notes = [
        f"framework / HF Trainer = **{speedup:.2f}x**; framework / tuned HF Trainer = **{vs_tuned:.2f}x**; "
        "framework overhead over the plain loop = "
        f"**{100 * (1 - rel_plain):+.1f} %** (negative: the framework was faster); ratios are medians of "
        "the within-round ratios",
        f"step by step on the same batches (median of {len(paired)} paired step times): the framework's step takes "
        f"**{100 * step_overhead:+.1f} %** ({extra_ms:+.1f} ms) against the plain loop's",
        f"torch threads: {torch.get_num_threads()}",
        *([] if BF16 else [f"the tuned HF Trainer rows train in fp32: {NO_BF16}"]),
        f"framework precision: {cfg.trainer.precision} (auto-detected); batch {cfg.data.batch_size}, lr {cfg.module.lr}; "
        f"{rounds_n} rounds x {windows} windows x {window} steps after {warmup} warm-up steps per contender"
        f"{'' if quick else ' (and, before the first round, one untimed 4-step pass of each)'}; "
        "each round starts from other batches (sampler seed + round), the same for all contenders in that round",
        f"batch fetching + collation in the plain loop: {100 * median(data_share):.1f} % of step time "
        "(why DataLoader workers stay at 0: the splits are tokenized once and collation is cheap)",
    ]
    return {"title": "Training throughput: framework vs HF Trainer vs plain loop (MiniLM-L6, RedditBias)",
            "tables": [{"rows": rows}], "notes": notes, "summary": summary}


if __name__ == "__main__":
    main("train", run)
