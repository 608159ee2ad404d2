"""Every config file composes; the default instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.helpers import CONF, compose

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local", "__pycache__"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXTRA = {("model", "local"): ["model.path=/nonexistent"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option, tmp_path):
    in_defaults = group in compose([]).hydra.runtime.choices  # e.g. `setting` is only added by grids
    overrides = [f"{'' if in_defaults else '+'}{group}={option}", *EXTRA.get((group, option), [])]
    cfg = compose(overrides)
    assert cfg.dataset.name and cfg.model.name and cfg.compressor.name


def test_default_config_instantiates(tmp_path):
    cfg = compose(["paths.output_dir=" + str(tmp_path)])
    assert (cfg.dataset.name, cfg.model.name, cfg.compressor.name) == ("redditbias", "minilm_l6", "none")
    dm = instantiate(cfg.data, _recursive_=False)
    assert dm.num_labels == 2 and len(dm.primary.group_names) == 10
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == cfg.dataset.train.max_epochs
    for name, spec in cfg.callbacks.items():
        assert instantiate(spec) is not None, name
    module_factory = instantiate(cfg.module)
    assert callable(module_factory)
    assert instantiate(cfg.objective).name == "erm"


def test_run_dirs_are_unique_per_process(tmp_path):
    cfg = compose([])
    assert "${" not in str(cfg.hydra.run.dir)
    from subgroup_robustness.utils import resolvers

    assert resolvers._UID in cfg.hydra.run.dir
