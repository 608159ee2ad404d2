"""Process settings for fast training on small and shared CPUs.

- Threads: PyTorch sizes its thread pool from the whole host. In a container with a CPU quota, or a job
  pinned to a few cores, that oversubscribes the cores and every step slows down. So the framework uses
  one thread per physical core that this process may run on, capped by the cgroup quota.
  ``OMP_NUM_THREADS`` or ``SR_NUM_THREADS`` override it.
- Compile caches: ``module.compile=true`` keeps inductor's FX-graph and AOTAutograd caches in the project's cache
  (``${paths.cache_dir}/compile``, unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so only the first run on a machine
  pays the code generation; later runs and the later jobs of a grid load the compiled kernels.
- Memory: glibc hands every block above 32 MB back to the kernel when it is freed. The dense gradient of
  a 30k-word embedding (47 MB for MiniLM, 94 MB for BERT-base) is freed and allocated again every step,
  so every step pays ~11k page faults to get zeroed pages back. Serving large blocks from the heap and
  keeping freed memory mapped removes that (``SR_KEEP_FREED_MEMORY=0`` turns it off).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores(cpus: list[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu"),
                   cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Distinct physical cores among ``cpus`` (default: this process's affinity), capped by the quota."""
    cpus = _affinity() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")  # no topology: count logical CPUs
    n = max(1, len(cores))
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def configure_threads() -> int:
    """Set torch's intra-op threads once per process; returns the count in use."""
    import torch

    if os.environ.get("SR_NUM_THREADS"):
        n = max(1, int(os.environ["SR_NUM_THREADS"]))
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        n = physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def keep_freed_memory(enable: bool = True) -> bool:
    """Keep large freed blocks mapped for reuse (``enable=False`` restores glibc's defaults).
    Returns whether the setting took effect (False off glibc, or when switched off by the environment)."""
    if not sys.platform.startswith("linux") or (enable and os.environ.get("SR_KEEP_FREED_MEMORY", "1") == "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    values = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30} if enable else _GLIBC_DEFAULTS
    return all(mallopt(param, value) == 1 for param, value in values.items())


def configure_compile_cache(cache_dir: str | os.PathLike | None) -> str | None:
    """Inductor's on-disk caches under ``<cache_dir>/compile`` (the FX-graph cache and the AOTAutograd cache,
    both keyed by the graph, its shapes' symbols and the torch version, so a stale entry is never used). A
    ``TORCHINDUCTOR_CACHE_DIR`` already set wins. Returns the folder in use (None without a cache_dir)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    elif cache_dir:
        folder = str(Path(cache_dir) / "compile")
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    else:
        return None
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


def configure_process(cache_dir: str | os.PathLike | None = None) -> dict:
    """The fast-path process settings of a run: threads, the allocator and (``cache_dir``) compile caches."""
    return {"threads": configure_threads(), "keep_freed_memory": keep_freed_memory(),
            "compile_cache": configure_compile_cache(cache_dir)}


def release_memory() -> None:
    """Hand a finished job's memory back: collect cycles (Lightning trainers, modules and loaders reference
    each other), empty the CUDA cache, and return freed heap pages to the kernel (``malloc_trim``; with
    ``keep_freed_memory`` on, glibc would otherwise keep them for the next job, and fragmentation makes a
    sweep's peak grow job after job)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
