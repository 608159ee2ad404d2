"""The calibration sampler draws only training examples, seeded, with the per-group composition its source
promises: natural (uniform), group_balanced (equal counts per group; a smaller group gives all it has and
the rest is spread evenly), worst_group (only the smallest training group)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from subgroup_robustness.data.calibration import (calibration_batches, calibration_from_spec, check_calibration,
                                                  draw_indices)
from subgroup_robustness.data.datamodule import TokenizedSplit
from subgroup_robustness.data.groups import PRIMARY, build_groupings
from subgroup_robustness.utils.errors import ConfigError

DATASET = {"name": "fake", "label_names": ["no", "yes"], "attributes": {"identity": ["a", "b", "c"]},
           "groupings": {"groups": {"by": ["label", "identity"]}}}
# train examples per group (label, identity): (0,a) (0,b) (0,c) (1,a) (1,b) (1,c)
TRAIN_SIZES = (40, 30, 25, 20, 12, 5)


def _split(sizes, start: int, seed: int, vocab: int = 120) -> TokenizedSplit:
    g = torch.Generator().manual_seed(seed)
    meta, ids, offsets = [], [], [0]
    for k, n in enumerate(sizes):
        meta += [[k // 3, k % 3]] * n
    for _ in meta:
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids.append(torch.randint(5, vocab, (length,), generator=g))
        offsets.append(offsets[-1] + length)
    n = len(meta)
    return TokenizedSplit(torch.cat(ids), torch.as_tensor(offsets), None, torch.as_tensor(meta),
                          torch.arange(start, start + n))


class FakeData:
    """What the sampler reads from a GroupDataModule: setup(), splits, primary, tokenizer, eval_batch_size.
    Training examples have dataset indices 0..131, validation 1000.., test 2000.."""

    def __init__(self, train_sizes=TRAIN_SIZES, eval_batch_size: int = 16):
        self.splits = {"train": _split(train_sizes, 0, 1), "val": _split((5,) * 6, 1000, 2),
                       "test": _split((5,) * 6, 2000, 3)}
        self.primary = build_groupings(DATASET)[PRIMARY]
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.eval_batch_size = eval_batch_size
        self.setups = 0

    def setup(self, stage=None):
        self.setups += 1


def fake_datamodule(**kw) -> FakeData:
    return FakeData(**kw)


def _drawn(batches):
    index = torch.cat([b["index"] for b in batches])
    meta = torch.cat([b["metadata"] for b in batches])
    return index, meta


def _group_counts(meta) -> Counter:
    return Counter((int(a), int(b)) for a, b in meta.tolist())


@pytest.mark.parametrize("source", ["natural", "group_balanced", "worst_group"])
def test_only_training_examples_are_drawn(source):
    dm = FakeData()
    batches, rec = calibration_batches(dm, source, 36, seed=3)
    index, _ = _drawn(batches)
    assert dm.setups == 1
    assert len(set(index.tolist())) == len(index) == rec["examples"]  # no repeats
    assert index.max() < sum(TRAIN_SIZES) and index.min() >= 0  # never a validation/test example
    assert rec["source"] == source and rec["split"] == "train"
    assert sorted(rec["dataset_index"]) == sorted(index.tolist())
    assert sum(rec["group_counts"].values()) == rec["examples"]  # disjoint groups: each example counted once


def test_batches_are_collated_like_training_batches():
    dm = FakeData(eval_batch_size=8)
    batches, _ = calibration_batches(dm, "natural", 20, seed=0)
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 4]
    for b in batches:
        assert set(b) >= {"input_ids", "attention_mask", "labels", "metadata", "index"}
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())  # padded to the batch's longest
        lengths = b["attention_mask"].sum(1)
        assert torch.equal(lengths, lengths.sort().values)  # sorted by length: little padding


def test_group_balanced_draws_equal_counts_per_group():
    dm = FakeData()
    _, rec = calibration_batches(dm, "group_balanced", 30, seed=1)  # 5 per group; every group has >= 5
    assert list(rec["group_counts"].values()) == [5] * 6
    batches, _ = calibration_batches(dm, "group_balanced", 30, seed=1)
    assert set(_group_counts(_drawn(batches)[1]).values()) == {5}


def test_group_balanced_spreads_a_small_groups_shortfall_evenly():
    dm = FakeData()
    _, rec = calibration_batches(dm, "group_balanced", 60, seed=2)  # 10 each, but (1, c) has only 5
    counts = list(rec["group_counts"].values())
    assert counts[-1] == 5 and rec["examples"] == 60
    assert sorted(counts[:-1]) == [11, 11, 11, 11, 11]  # the 5 missing go one to each other group
    _, rec = calibration_batches(dm, "group_balanced", 62, seed=2)  # remainder 2: two groups get one more
    assert sorted(list(rec["group_counts"].values())[:-1]) == [11, 11, 11, 12, 12] and rec["examples"] == 62
    _, rec = calibration_batches(dm, "group_balanced", 10_000, seed=2)  # more than the split: all of it
    assert list(rec["group_counts"].values()) == list(TRAIN_SIZES) and "note" in rec


def test_natural_is_uniform_and_worst_group_is_the_smallest_training_group():
    dm = FakeData()
    _, rec = calibration_batches(dm, "natural", sum(TRAIN_SIZES), seed=4)  # the whole split
    assert list(rec["group_counts"].values()) == list(TRAIN_SIZES)
    batches, rec = calibration_batches(dm, "worst_group", 3, seed=4)
    assert rec["group"] == "yes:c" and rec["group_counts"]["yes:c"] == 3 == rec["examples"]
    assert set(_group_counts(_drawn(batches)[1])) == {(1, 2)}
    _, rec = calibration_batches(dm, "worst_group", 50, seed=4)  # only 5 exist: all of them, never repeated
    assert rec["examples"] == 5 and "smallest group" in rec["note"]


def test_draws_are_seeded():
    dm = FakeData()
    a = calibration_batches(dm, "natural", 40, seed=7)[1]["dataset_index"]
    b = calibration_batches(dm, "natural", 40, seed=7)[1]["dataset_index"]
    c = calibration_batches(dm, "natural", 40, seed=8)[1]["dataset_index"]
    assert a == b and a != c
    rec = calibration_from_spec(dm, {"source": "natural", "examples": 40, "seed": None}, default_seed=7)[1]
    assert rec["dataset_index"] == a and rec["seed"] == 7  # seed null: the run's seed


def test_overlapping_groups_draw_from_every_group():
    masks = torch.zeros(100, 3, dtype=torch.bool)
    masks[:60, 0] = True
    masks[40:70, 1] = True  # 20 examples in both group 0 and group 1
    masks[90:, 2] = True   # 10 examples; 70..89 in no group: never drawn
    chosen, _ = draw_indices(masks, "group_balanced", 15, seed=0)
    assert len(chosen) == len(set(chosen.tolist())) == 15
    assert not ((chosen >= 70) & (chosen < 90)).any()
    assert (masks[torch.as_tensor(chosen)].sum(0) >= 5).all()


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ConfigError, match="calibration.source"):
        check_calibration({"source": "validation"}, "wanda")
    with pytest.raises(ConfigError, match="examples"):
        check_calibration({"examples": 0}, "wanda")
    with pytest.raises(ConfigError, match="unknown keys"):
        check_calibration({"batches": 4}, "wanda")
    assert check_calibration(None, "x") == {"source": "natural", "examples": 256, "seed": 0}


def test_real_datamodule_draws_training_rows_only(tiny_model_dir, redditbias_root, tmp_path):
    from hydra.utils import instantiate
    from transformers import AutoTokenizer

    from tests.helpers import compose

    cfg = compose([f"dataset.source.root={redditbias_root}", f"data.cache_dir={tmp_path / 'cache'}",
                   "paths.output_dir=" + str(tmp_path)])
    dm = instantiate(cfg.data, _recursive_=False)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    batches, rec = calibration_batches(dm, "group_balanced", 40, seed=0)
    table = dm.load_table()
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert len(index) == rec["examples"] > 0
    assert set(table.loc[index, "split"]) == {"train"}
    sizes = np.array(list(rec["group_sizes_train"].values()))
    counts = np.array(list(rec["group_counts"].values()))
    full = counts[sizes >= counts.max()]  # groups that could give their whole share gave the same count
    assert len(set(full.tolist())) == 1
