"""Every config file composes; the default instantiates; compressor knobs follow one convention; every
setting file is the one its name implies.

``conf/setting/<name>.yaml`` files are generated from their name (see ``setting_yaml``); write a new one
with ``.venv/bin/python -m tests.test_config <name>...``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import CONF, compose

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local", "__pycache__"))


def options(group: str) -> list[str]:
    """The names ``<group>=...`` accepts: files starting with ``_`` are bases that options inherit."""
    return [f.stem for f in sorted((CONF / group).glob("*.yaml")) if not f.stem.startswith("_")]


OPTIONS = [(g, o) for g in GROUPS for o in options(g)]
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
    fit_only = set()
    for name, spec in cfg.callbacks.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        if spec.pop("fit_only", False):  # popped before instantiating (see conf/callbacks/default.yaml)
            fit_only.add(name)
        assert instantiate(spec) is not None, name
    assert fit_only == {"early_stopping", "best_weights"}
    module_factory = instantiate(cfg.module)
    assert callable(module_factory)
    assert instantiate(cfg.objective).name == "erm"


def test_run_dirs_are_unique_per_process(tmp_path):
    cfg = compose([])
    assert "${" not in str(cfg.hydra.run.dir)
    from subgroup_robustness.utils import resolvers

    assert resolvers._UID in cfg.hydra.run.dir


# ---- compressors: one knob convention ----------------------------------------------------------------
def test_compressor_bases_are_not_options():
    bases = sorted(f.stem for f in (CONF / "compressor").glob("_*.yaml"))
    assert bases and not set(bases) & set(options("compressor"))
    for base in bases:  # a base leaves the level's name (and number) to the file that inherits it
        assert OmegaConf.is_missing(OmegaConf.load(CONF / "compressor" / f"{base}.yaml"), "name"), base


@pytest.mark.parametrize("name", options("compressor"))
def test_compressor_knobs_are_top_level(name):
    """Every stage argument is a top-level ``compressor.<knob>`` of the same name, interpolated into the
    stage (``compressor.sparsity=0.3``); ``compressor.stages.0.<knob>=...`` still overrides one stage."""
    comp = compose([f"compressor={name}"]).compressor
    for stage in OmegaConf.to_container(comp, resolve=False).get("stages") or []:
        for key, value in stage.items():
            if key != "_target_":
                assert value == f"${{compressor.{key}}}", f"compressor={name}: stages[].{key} = {value!r}"
                assert key in comp, f"compressor={name}: no top-level knob {key}"


def test_stage_overrides_still_reach_the_stage():
    comp = compose(["compressor=vt50", "compressor.stages.0.percent=30", "compressor.mlm_epochs=2"]).compressor
    stage = OmegaConf.to_container(comp.stages[0], resolve=True)
    assert (stage["percent"], stage["mlm_epochs"], comp.percent) == (30, 2, 50)
    comp = compose(["compressor=distill_l2", "compressor.temperature=4",
                    "compressor.stages.0.keep_layers=[1,3]"]).compressor
    stage = OmegaConf.to_container(comp.stages[0], resolve=True)
    assert (stage["num_layers"], stage["temperature"], stage["keep_layers"]) == (2, 4, [1, 3])


# ---- settings: generated from their name -------------------------------------------------------------
SETTING_HEADER = "# @package _global_\n"


def setting_yaml(name: str) -> str:
    """The one content ``conf/setting/<name>.yaml`` may have: ``base`` is the reference model without
    compression; a compressor's name is the reference model with that compressor; a model's name is that
    model (a distilled checkpoint) fine-tuned without compression."""
    note = "(generated: .venv/bin/python -m tests.test_config <name>; see conf/setting/README.md)"
    is_compressor = (CONF / "compressor" / f"{name}.yaml").exists() and not name.startswith("_")
    is_model = (CONF / "model" / f"{name}.yaml").exists()
    if name == "base":
        return (f"{SETTING_HEADER}# setting=base: the reference row, the experiment's model fine-tuned without "
                f"compression\n# {note}\ndefaults:\n  - override /compressor: none\n")
    if is_compressor and is_model:
        raise ValueError(f"{name!r} is both a compressor and a model config; a setting cannot tell which")
    if is_compressor:
        return (f"{SETTING_HEADER}# setting={name}: the reference model compressed with compressor={name}\n"
                f"# {note}\ndefaults:\n  - override /compressor: {name}\n")
    if is_model:
        return (f"{SETTING_HEADER}# setting={name}: the checkpoint model={name} fine-tuned without compression "
                f"(a distilled-checkpoint row)\n# {note}\ndefaults:\n  - override /model: {name}\n"
                f"  - override /compressor: none\n")
    raise ValueError(f"{name!r} is neither `base` nor a conf/compressor or conf/model config")


@pytest.mark.parametrize("name", options("setting"))
def test_setting_file_is_the_one_its_name_implies(name):
    path = CONF / "setting" / f"{name}.yaml"
    assert path.read_text(encoding="utf-8") == setting_yaml(name), (
        f"{path} is not the file its name implies; rewrite it with: .venv/bin/python -m tests.test_config {name}")


def test_every_grid_setting_exists():
    import yaml

    for exp in sorted((CONF / "experiment").glob("*.yaml")):
        params = (((yaml.safe_load(exp.read_text()) or {}).get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        for name in str(params.get("setting") or "").split(","):
            if name:
                assert name in options("setting"), (f"{exp.name} sweeps setting={name}, but "
                                                    f"conf/setting/{name}.yaml is missing")


def write_settings(names: list[str]) -> list[Path]:
    written = []
    for name in names:
        path = CONF / "setting" / f"{name}.yaml"
        path.write_text(setting_yaml(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # python -m tests.test_config <name>...: write conf/setting/<name>.yaml
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.test_config <setting name>...  (a compressor or a model config name, or base)")
    for p in write_settings(sys.argv[1:]):
        print(p)
