"""The data path: tokenized once and cached, batches carry metadata, padding is per batch; a source's
table is checked against its dataset config."""

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoTokenizer

from subgroup_robustness.data.datamodule import BucketBatchSampler, GroupDataModule, validate_table
from subgroup_robustness.utils.errors import ConfigError, CorruptDataError
from tests.helpers import compose


def _dm(tiny_model_dir, redditbias_root, tmp_path, *extra):
    cfg = compose([f"dataset.source.root={redditbias_root}", f"data.cache_dir={tmp_path / 'cache'}",
                   "paths.output_dir=" + str(tmp_path), *extra])
    dm = instantiate(cfg.data, _recursive_=False)
    dm.set_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    return dm


def test_batches_carry_metadata_and_dynamic_padding(tiny_model_dir, redditbias_root, tmp_path):
    dm = _dm(tiny_model_dir, redditbias_root, tmp_path, "data.batch_size=8")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "metadata", "index"}
    assert batch["metadata"].shape == (8, 2) and torch.equal(batch["metadata"][:, 0], batch["labels"])
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == longest  # padded to the batch's longest, not max_length
    sizes = {s: len(dm.splits[s]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 300
    # every example's metadata matches the table it came from
    table = dm.load_table()
    row = table.loc[int(batch["index"][0])]
    assert batch["metadata"][0].tolist() == [row["label"], row["identity"]]


def test_token_cache_is_reused(tiny_model_dir, redditbias_root, tmp_path, monkeypatch):
    dm = _dm(tiny_model_dir, redditbias_root, tmp_path)
    dm.setup()
    files = list((tmp_path / "cache" / "tokenized").glob("*.pt"))
    assert len(files) == 1
    dm2 = _dm(tiny_model_dir, redditbias_root, tmp_path)
    monkeypatch.setattr(type(dm2), "_tokenize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    dm2.setup()
    assert torch.equal(dm2.splits["train"].ids, dm.splits["train"].ids)


def test_subsample_is_stratified_and_seeded(tiny_model_dir, redditbias_root, tmp_path):
    dm = _dm(tiny_model_dir, redditbias_root, tmp_path, "+dataset.subsample={train: 100, val: 20, test: 30}")
    t = dm.load_table()
    assert abs((t["split"] == "train").sum() - 100) <= 10
    counts = dm.group_counts()
    assert (counts["test"] >= 1).all()  # every group keeps at least one example
    dm2 = _dm(tiny_model_dir, redditbias_root, tmp_path, "+dataset.subsample={train: 100, val: 20, test: 30}")
    assert dm2.load_table()["text"].tolist() == t["text"].tolist()


def test_bucket_sampler_covers_each_example_once_and_reshuffles():
    lengths = np.random.default_rng(0).integers(1, 60, size=203)
    s = BucketBatchSampler(lengths, 16, shuffle=True, seed=0, pool_batches=4)
    e1, e2 = list(s), list(s)
    assert sorted(i for b in e1 for i in b) == list(range(203))
    assert e1 != e2
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in e1])
    assert spread < np.mean(lengths.max() - lengths.min()) / 2  # batches group similar lengths
    ev = BucketBatchSampler(lengths, 16, shuffle=False)
    assert list(ev) == list(ev)
    shards = [BucketBatchSampler(lengths, 16, shuffle=False, num_replicas=2, rank=r) for r in (0, 1)]
    assert sorted(i for sh in shards for b in sh for i in b) == list(range(203))  # eval never duplicates


# ---- the table contract: every label and attribute code indexes its names ------------------------------
TOY = {"name": "toy", "label_names": ["no", "yes"], "attributes": {"colour": ["red", "green", "blue"]},
       "groupings": {"groups": {"by": ["label", "colour"]}},
       "train": {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 4, "max_epochs": 1}}


def _toy_table(colour, label=(0, 1, 0, 1)) -> pd.DataFrame:
    return pd.DataFrame({"text": list("abcd"), "label": list(label), "colour": list(colour),
                         "split": ["train", "train", "val", "test"]})


def test_validate_table_accepts_codes_inside_every_vocabulary():
    validate_table(_toy_table([0, 1, 2, 2]), TOY)


@pytest.mark.parametrize("colour,shown", [
    ([0, 3, 2, 7], "['3', '7']"),        # past the end of attributes.colour
    ([0, -1, 2, 1], "['-1']"),           # negative
    ([0, 1.5, 2, 1], "['1.5']"),         # not an integer code
    ([0, None, 2, 1], "['nan']"),        # missing
])
def test_attribute_codes_outside_the_vocabulary_are_named(colour, shown):
    with pytest.raises(CorruptDataError) as info:
        validate_table(_toy_table(colour), TOY)
    assert str(info.value) == (f"dataset 'toy': column 'colour' has value(s) {shown} outside 0..2, the indices of "
                               "attributes.colour ['red', 'green', 'blue']; the source and the dataset config disagree")


def test_label_codes_outside_label_names_are_named():
    with pytest.raises(CorruptDataError, match=r"column 'label' has value\(s\) \['2'\] outside 0..1, the indices of "
                                               r"label_names \['no', 'yes'\]"):
        validate_table(_toy_table([0, 1, 2, 0], label=(0, 1, 2, 0)), TOY)


def toy_source(colour_codes) -> pd.DataFrame:
    """A dataset source (``dataset.source._target_``) for the test below."""
    return _toy_table(colour_codes)


def test_the_datamodule_rejects_a_source_that_disagrees_with_its_config():
    cfg = {**TOY, "source": {"_target_": f"{__name__}.toy_source", "colour_codes": [0, 1, 2, 3]}}
    dm = GroupDataModule(dataset=cfg)
    with pytest.raises(CorruptDataError, match="column 'colour' has value"):
        dm.load_table()
    cfg["source"]["colour_codes"] = [0, 1, 2, 2]
    assert len(GroupDataModule(dataset=cfg).load_table()) == 4


def test_the_datamodule_checks_the_dataset_spec():
    with pytest.raises(ConfigError, match=r"dataset 'toy' .*missing `train`"):
        GroupDataModule(dataset={k: v for k, v in TOY.items() if k != "train"})
