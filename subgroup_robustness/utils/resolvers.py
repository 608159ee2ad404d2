"""OmegaConf resolvers used by the configs (registered once, before Hydra composes)."""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

_UID = f"{os.getpid():x}{secrets.token_hex(2)}"


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


def register() -> None:
    if not OmegaConf.has_resolver("sr.job_dir"):
        import subgroup_robustness.sweep  # noqa: F401 - registers sr.job_dir (deterministic sweep job dirs)
    if OmegaConf.has_resolver("sr.uid"):
        return
    # unique per process: two jobs that start in the same second never share a run directory
    OmegaConf.register_new_resolver("sr.uid", lambda: _UID, use_cache=True)
    OmegaConf.register_new_resolver("sr.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))
    OmegaConf.register_new_resolver("sr.precision", auto_precision)
    OmegaConf.register_new_resolver("sr.cache_home", lambda: os.environ.get(
        "SR_CACHE_DIR", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                     "subgroup_robustness")))
