"""OmegaConf resolvers used by the configs (registered once, before Hydra composes)."""

from __future__ import annotations

import os
import secrets

from omegaconf import DictConfig, OmegaConf

from subgroup_robustness.utils.io import stable_hash

_UID = f"{os.getpid():x}{secrets.token_hex(2)}"
MAX_DIRNAME = 100


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(value: str = "auto") -> str:
    """bf16 autocast where the hardware runs it natively (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else fp32."""
    if value != "auto":
        return value
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def job_dirname(dirname: str, *, _root_: DictConfig) -> str:
    """A job's folder from its overrides: Hydra's ``override_dirname`` when it is short and has no path in
    it; otherwise the short overrides plus a hash of all of them. Deterministic, so a relaunch finds every
    finished job in its old folder. Resolver ``sr.job_dir``."""
    if dirname and len(dirname) <= MAX_DIRNAME and "/" not in dirname:
        return dirname
    if not dirname:
        return "default"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    exclude = set(_root_.hydra.job.config.override_dirname.exclude_keys or [])
    overrides = OverridesParser.create().parse_overrides(list(_root_.hydra.overrides.task))
    short = sorted(o.input_line for o in overrides if o.key_or_group not in exclude
                   and "/" not in o.input_line and len(o.input_line) <= 40)
    return ",".join([*short, f"h={stable_hash(dirname, 8)}"])


def _vocabulary(*args):
    """``${sr.vocab:<source>,<NAME>[,<ids>]}``: a dataset vocabulary defined once, in its source module."""
    from subgroup_robustness.data.spec import vocabulary

    return vocabulary(*args)


def register() -> None:
    """Register the project's resolvers (idempotent); called by the entry point and ``utils.compose``."""
    if OmegaConf.has_resolver("sr.uid"):
        return
    OmegaConf.register_new_resolver("sr.job_dir", job_dirname)
    OmegaConf.register_new_resolver("sr.vocab", _vocabulary)
    # unique per process: two jobs that start in the same second never share a run directory
    OmegaConf.register_new_resolver("sr.uid", lambda: _UID, use_cache=True)
    OmegaConf.register_new_resolver("sr.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))
    OmegaConf.register_new_resolver("sr.precision", auto_precision)
    OmegaConf.register_new_resolver("sr.cache_home", lambda: os.environ.get(
        "SR_CACHE_DIR", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                     "subgroup_robustness")))
