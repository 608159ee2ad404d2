"""The dataset schema is declared and checked before anything resolves; each vocabulary is defined once,
in its source module, and every dataset YAML refers to it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from omegaconf import OmegaConf, open_dict

import subgroup_robustness.data.sources as sources_pkg
from subgroup_robustness.data.datamodule import GroupDataModule
from subgroup_robustness.data.spec import problems, validate_dataset_spec, vocabulary
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import CONF, compose

DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
MINIMAL = {
    "name": "toy",
    "source": {"_target_": "tests.toy.load", "cache_dir": "${paths.data_dir}/toy"},
    "label_names": ["no", "yes"],
    "attributes": {"group": ["a", "b"]},
    "groupings": {"groups": {"by": ["label", "group"]}},
    "train": {"lr": 2e-5, "weight_decay": 0.0, "batch_size": 8, "max_epochs": 1},
}


def _without(path: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.create(MINIMAL))
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    del node[last]
    return cfg


def test_a_dataset_without_train_is_one_line_naming_it():
    with pytest.raises(ConfigError) as info:
        validate_dataset_spec(_without("train"))
    msg = str(info.value)
    assert msg.startswith("dataset 'toy' (conf/dataset/toy.yaml): missing `train` (e.g. `train: {lr: ")
    assert "\n" not in msg and "train.lr" not in msg  # the parent is reported, not its four children


def test_raw_config_is_checked_without_resolving_outside_interpolations():
    # ${paths.data_dir} points outside the dataset and cannot resolve here: the check must not try
    cfg = OmegaConf.create(_without("train.max_epochs"))
    with pytest.raises(ConfigError, match=r"missing `train.max_epochs` \(e.g. `train: \{max_epochs: 3\}`\)"):
        validate_dataset_spec(cfg)
    cfg = OmegaConf.create({**MINIMAL, "train": {**MINIMAL["train"], "lr": "???"}})
    with pytest.raises(ConfigError, match=r"missing `train.lr`"):
        validate_dataset_spec(cfg)
    validate_dataset_spec(OmegaConf.create(MINIMAL))  # conforms, unresolved


def test_composed_config_without_train_is_named_before_any_interpolation_error():
    cfg = compose(["dataset=scotus", "~dataset.train"])
    with pytest.raises(ConfigError, match=r"dataset 'scotus' .*missing `train`"):
        validate_dataset_spec(cfg.dataset)
    with pytest.raises(ConfigError, match=r"missing `train`"):
        GroupDataModule(dataset=cfg.dataset)


@pytest.mark.parametrize("key,value,expected", [
    ("max_length", "long", "`max_length` is 'long', expected a positive integer"),
    ("max_length", 0, "`max_length` is 0, expected a positive integer"),
    ("truncation_side", "middle", "`truncation_side` is 'middle', expected left or right"),
    ("text_pair", "yes", "`text_pair` is 'yes', expected true or false"),
    ("label_names", ["only"], "`label_names` is ['only'], expected a list of two or more names"),
    ("attributes", {"label": ["a", "b"]}, "`attributes` is {'label': ['a', 'b']}, expected a mapping from column"),
    ("subsample", {"training": 10}, "`subsample` is {'training': 10}, expected null or a mapping"),
    ("train", {"lr": -1, "weight_decay": 0, "batch_size": 2.5, "max_epochs": True},
     "`train.lr` is -1, expected a positive number"),
    ("source", {"cache_dir": "x"}, "missing `source._target_`"),
    ("groupings", {"wilds": {"each": ["a"]}}, "missing `groupings.groups`"),
])
def test_ill_typed_literals_are_named(key, value, expected):
    with pytest.raises(ConfigError) as info:
        validate_dataset_spec({**MINIMAL, key: value})
    assert expected in str(info.value)


def test_every_problem_is_listed_and_interpolated_values_are_not_type_checked():
    found = problems({**MINIMAL, "max_length": "${model.max_length}", "label_names": "${sr.vocab:x,LABELS}",
                      "train": {"lr": "fast", "weight_decay": 0, "batch_size": 2.5, "max_epochs": True}})
    assert found == [
        "`train.lr` is 'fast', expected a positive number (e.g. `train: {lr: 2e-5}`)",
        "`train.batch_size` is 2.5, expected a positive integer (e.g. `train: {batch_size: 32}`)",
        "`train.max_epochs` is True, expected a positive integer (e.g. `train: {max_epochs: 3}`)",
    ]
    assert problems(None) == ["the dataset config is NoneType, not a mapping; choose one with dataset=<name>"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_config_conforms(dataset):
    raw = compose([f"dataset={dataset}"]).dataset
    assert problems(raw) == []
    assert problems(OmegaConf.to_container(raw, resolve=True)) == []


# ---- one vocabulary -------------------------------------------------------------------------------
def _source_modules():
    for info in pkgutil.iter_modules(sources_pkg.__path__):
        module = importlib.import_module(f"{sources_pkg.__name__}.{info.name}")
        if callable(getattr(module, "load", None)):
            yield info.name, module


def test_every_source_exports_its_vocabulary():
    names = dict(_source_modules())
    assert set(names) == {"cail", "civilcomments", "ecthr", "fscs", "mhc", "multinli", "redditbias", "scotus", "xnli"}
    for name, module in names.items():
        assert len(module.LABELS) >= 2 and all(isinstance(x, str) for x in module.LABELS), name
        assert all(len(v) >= 2 for v in module.ATTRIBUTES.values()), name


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_yaml_refers_to_its_source_vocabulary(dataset):
    """The YAML holds no copy of the names: label_names and attributes are interpolations into the
    vocabulary of the very module its source._target_ names, so the two cannot disagree."""
    d = compose([f"dataset={dataset}"]).dataset
    module_name = d.source._target_.rsplit(".", 1)[0]
    module = importlib.import_module(module_name)
    short = module_name.rsplit(".", 1)[1]
    for key, const in (("label_names", "LABELS"), ("attributes", "ATTRIBUTES")):
        assert OmegaConf.is_interpolation(d, key), f"{dataset}.yaml spells out {key}; use ${{sr.vocab:{short},{const}}}"
        assert OmegaConf.to_container(d, resolve=False)[key].startswith(f"${{sr.vocab:{short},{const}"), (dataset, key)
    kept = d.source.get("labels")
    assert list(d.label_names) == [module.LABELS[i] for i in (kept if kept is not None else range(len(module.LABELS)))]
    assert OmegaConf.to_container(d.attributes) == {k: list(v) for k, v in module.ATTRIBUTES.items()}


def test_wilds16_is_the_module_identities():
    from subgroup_robustness.data.sources import civilcomments

    d = compose(["dataset=civilcomments"]).dataset
    assert OmegaConf.is_interpolation(d.groupings.wilds16, "each")
    assert list(d.groupings.wilds16.each) == list(civilcomments.IDENTITIES)
    assert set(civilcomments.IDENTITIES) < set(civilcomments.ATTRIBUTES)


def test_changing_the_module_changes_the_config(monkeypatch):
    from subgroup_robustness.data.sources import redditbias

    monkeypatch.setattr(redditbias, "ATTRIBUTES", {"identity": ("a", "b")})
    monkeypatch.setattr(redditbias, "LABELS", ("no", "yes"))
    d = compose(["dataset=redditbias"]).dataset
    assert list(d.label_names) == ["no", "yes"] and OmegaConf.to_container(d.attributes) == {"identity": ["a", "b"]}


def test_vocabulary_resolver_errors_say_what_to_write():
    assert OmegaConf.to_container(vocabulary("multinli", "LABELS", [2, 0])) == ["neutral", "contradiction"]
    with pytest.raises(ConfigError, match="no module subgroup_robustness.data.sources.nope"):
        vocabulary("nope", "LABELS")
    with pytest.raises(ConfigError, match="defines no vocabulary 'NAME'"):
        vocabulary("multinli", "NAME")  # a string constant, not a vocabulary
    with pytest.raises(ConfigError, match=r"ids among 0..2"):
        vocabulary("multinli", "LABELS", [0, 3])
    with pytest.raises(ConfigError, match=r"ids among"):
        vocabulary("multinli", "ATTRIBUTES", [0])
    cfg = compose(["dataset=multinli_bin12"])
    with open_dict(cfg):
        cfg.dataset.source.labels = [1, 5]
    with pytest.raises(Exception, match=r"ids among 0..2"):
        list(cfg.dataset.label_names)
