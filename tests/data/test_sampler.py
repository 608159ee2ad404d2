"""The fast data path is also the correct path: bucketed batches keep every example exactly once per
epoch and reshuffle across epochs, padding stays per batch (far less of it than random or fixed-length
batches), DDP shards have equal steps, and a real Lightning fit sees each example once per epoch in new
orders while every evaluation runs without autograd. No timing assertions here: the timings live in
benchmarks/."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import torch
from hydra.utils import instantiate

from subgroup_robustness.data.datamodule import BucketBatchSampler, Collator, TokenizedSplit
from tests.helpers import compose


def _lengths(n=517, seed=0):
    # long-tailed like real comments: mostly short, a few long
    return np.clip(np.random.default_rng(seed).lognormal(3.0, 0.5, size=n).astype(int), 3, 128)


# ---- bucketing ------------------------------------------------------------------------------------
def test_each_epoch_has_every_example_exactly_once_and_epochs_differ():
    lengths = _lengths()
    s = BucketBatchSampler(lengths, 32, shuffle=True, seed=3)
    epochs = []
    for epoch in range(4):
        s.set_epoch(epoch)  # what Lightning does before each epoch
        batches = list(s)
        assert len(batches) == len(s)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # none lost, none repeated
        epochs.append(flat)
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    # batch order is shuffled too: short and long batches are interleaved, not sorted
    first = [float(np.mean(lengths[b])) for b in BucketBatchSampler(lengths, 32, shuffle=True, seed=3)]
    assert first != sorted(first) and first != sorted(first, reverse=True)


def test_bucketing_is_seeded():
    lengths = _lengths()
    a = BucketBatchSampler(lengths, 32, shuffle=True, seed=7)
    b = BucketBatchSampler(lengths, 32, shuffle=True, seed=7)
    c = BucketBatchSampler(lengths, 32, shuffle=True, seed=8)
    assert [list(a) for _ in range(2)] == [list(b) for _ in range(2)]
    assert list(BucketBatchSampler(lengths, 32, shuffle=True, seed=7)) != list(c)


def _padding_fraction(lengths, batches, fixed=None):
    padded = sum((fixed or int(lengths[b].max())) * len(b) for b in batches)
    return 1 - sum(int(lengths[b].sum()) for b in batches) / padded


def test_bucketing_cuts_padding_against_random_batches_and_fixed_length():
    lengths = _lengths()
    bucketed = list(BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket=True))
    random = list(BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket=False))
    fixed = _padding_fraction(lengths, random, fixed=128)
    dyn, buck = _padding_fraction(lengths, random), _padding_fraction(lengths, bucketed)
    assert buck < 0.1 < dyn < fixed, (buck, dyn, fixed)


def test_ddp_training_shards_have_equal_steps_and_cover_everything():
    lengths = _lengths(203)
    shards = [BucketBatchSampler(lengths, 16, shuffle=True, seed=0, num_replicas=3, rank=r) for r in range(3)]
    batches = [list(s) for s in shards]
    assert len({len(b) for b in batches}) == 1 and all(len(b) == len(s) for b, s in zip(batches, shards))
    assert set(i for bs in batches for b in bs for i in b) == set(range(203))


def test_collator_pads_to_the_batch_longest_with_an_exact_mask():
    lengths = [5, 9, 2]
    ids = torch.arange(1, sum(lengths) + 1, dtype=torch.int32)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
    split = TokenizedSplit(ids, offsets, None, torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.tensor([10, 11, 12]))
    batch = Collator(pad_id=0)([split[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 9)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["input_ids"][2, :2].tolist() == [15, 16]  # tokens kept in order, none truncated
    assert batch["labels"].tolist() == [0, 1, 1] and batch["index"].tolist() == [10, 11, 12]


class _Record(L.Callback):
    def __init__(self):
        self.epochs: dict[int, list[int]] = {}
        self.eval_inference: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_inference.append((trainer.state.fn.value, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    on_test_batch_start = on_validation_batch_start


def test_lightning_fit_sees_each_example_once_per_epoch_in_new_orders(tiny_model_dir, redditbias_root, sr_env):
    from subgroup_robustness.models.loading import load_model

    cfg = compose(["model=local", f"model.path={tiny_model_dir}", f"dataset.source.root={redditbias_root}",
                   "trainer.max_epochs=2", "trainer.precision=32-true", f"paths.output_dir={sr_env}",
                   "data.batch_size=16"])
    dm = instantiate(cfg.data, _recursive_=False)
    model, tok = load_model(cfg.model, 2)
    dm.set_tokenizer(tok)
    dm.setup()
    module = instantiate(cfg.module)(model=model)
    rec = _Record()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[rec], enable_progress_bar=False,
                          default_root_dir=str(sr_env))
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    train_index = sorted(dm.splits["train"].index.tolist())
    assert sorted(rec.epochs[0]) == train_index and sorted(rec.epochs[1]) == train_index
    assert rec.epochs[0] != rec.epochs[1]
    stages = {fn for fn, _, _ in rec.eval_inference}
    assert stages == {"fit", "validate", "test"}
    assert not any(grad for _, _, grad in rec.eval_inference)  # no autograd graph during any evaluation
    # the evaluation that produces the results runs under inference_mode; Lightning's in-fit validation
    # uses no_grad by design (inference tensors must not leak into the training that follows)
    assert all(inf for fn, inf, _ in rec.eval_inference if fn in ("validate", "test"))
