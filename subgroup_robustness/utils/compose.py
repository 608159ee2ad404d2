"""One way to compose the run's config outside ``@hydra.main``: for tests, benchmarks, the ``describe``
command and chain members. It uses the running app's Hydra when there is one (so a user's
``hydra.searchpath`` applies), else the packaged configs."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGED_CONFIGS = "subgroup_robustness.conf"


@contextmanager
def hydra_session() -> Iterator[list[str]]:
    """An initialised Hydra (the running app's, else one on the packaged configs) and the overrides that
    give it this job's ``hydra.searchpath``, which composing without the primary config would lose."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from subgroup_robustness.utils.resolvers import register

    register()
    try:
        searchpath = [str(p) for p in (HydraConfig.get().searchpath or [])]
    except ValueError:  # no job config: a plain library call
        searchpath = []
    extra = ["hydra.searchpath=[" + ",".join(repr(p) for p in searchpath) + "]"] if searchpath else []
    if GlobalHydra.instance().is_initialized():
        yield extra
    else:
        with initialize_config_module(PACKAGED_CONFIGS, version_base="1.3"):
            yield extra


def compose(overrides: Sequence[str] = (), out_dir: str | Path | None = None, resolve: bool = True,
            fresh: bool = False, hydra: bool = False) -> DictConfig:
    """The config of ``python -m subgroup_robustness <overrides>``. With ``out_dir`` the job's runtime
    fields are set as a run sets them (``paths.output_dir``) and the Hydra node is dropped; ``resolve``
    then resolves every interpolation. ``fresh`` composes from the packaged configs even when another
    Hydra is initialised (benchmarks, tests); ``hydra`` keeps the ``hydra`` node (runtime choices, sweeper)
    when there is no ``out_dir``."""
    from hydra import compose as hcompose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if fresh:
        GlobalHydra.instance().clear()
    overrides = list(overrides)
    with hydra_session() as extra:
        if out_dir is None:
            return hcompose(config_name="config", overrides=[*overrides, *extra], return_hydra_config=hydra)
        cfg = hcompose(config_name="config", overrides=[*overrides, *extra, f"hydra.run.dir={out_dir}"],
                       return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        del cfg["hydra"]
    if resolve:
        OmegaConf.resolve(cfg)
    return cfg


def compose_group(group: str, name: str) -> DictConfig:
    """The composed config of ``<group>=<name>`` alone (e.g. a chain member, a student model), from the
    same config sources as this run; raises hydra's MissingConfigException when there is none."""
    from hydra import compose as hcompose

    with hydra_session() as extra:
        return hcompose(config_name=None, overrides=[f"+{group}={name}", *extra])[group]


def group_options(group: str) -> list[str]:
    """The names ``<group>=...`` accepts (files starting with ``_`` are bases, not options)."""
    from hydra.core.global_hydra import GlobalHydra

    with hydra_session() as extra:
        names = GlobalHydra.instance().config_loader().get_group_options(group, config_name=None, overrides=extra)
    return sorted(n for n in names if not n.split("/")[-1].startswith("_"))


def as_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})  # type: ignore[return-value]


def is_multirun(config: DictConfig | None = None) -> bool:
    """Whether this job is part of a ``--multirun`` sweep (from ``config.hydra.mode``, else the running
    app's Hydra config)."""
    from hydra.types import RunMode

    if config is not None and OmegaConf.select(config, "hydra.mode", default=None) is not None:
        return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False
