"""Process settings of the fast path: the composed defaults are the fast ones, thread counts follow the
cores a process may use (and the user's overrides), and the allocator setting applies and reverts."""

from __future__ import annotations

import sys

import torch

from subgroup_robustness.utils import perf
from tests.helpers import compose


def test_fast_path_is_the_default():
    cfg = compose([])
    assert cfg.data.bucket is True and cfg.data.num_workers == 0
    assert cfg.module.fused_adamw is True and cfg.module.compile is False
    assert cfg.trainer.get("inference_mode", True) is not False


# ---- threads --------------------------------------------------------------------------------------
def _fake_sysfs(root, topology):
    for cpu, (pkg, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_cores_not_hyperthreads_and_respects_the_quota(tmp_path):
    sysfs = _fake_sysfs(tmp_path / "cpu", {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    no_cgroup = tmp_path / "none"
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, no_cgroup) == 3
    assert perf.physical_cores([0, 1], sysfs, no_cgroup) == 1  # pinned to one core's two threads
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container quota
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, cg) == 2
    (cg / "cpu.max").write_text("max 100000\n")
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, cg) == 3


def test_configure_threads_obeys_overrides(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SR_NUM_THREADS", "1")
        assert perf.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("SR_NUM_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        assert perf.configure_threads() == 1  # OMP_NUM_THREADS: the user's choice, left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(perf, "physical_cores", lambda: 2)
        assert perf.configure_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- allocator ------------------------------------------------------------------------------------
def test_keep_freed_memory_applies_and_reverts(monkeypatch):
    """The contract only: glibc accepts both parameter sets (mallopt returns 0 for an unknown parameter or
    value) and the environment switches it off. Whether the kernel then stops re-faulting freed blocks
    depends on the sandbox (it did here, not on the CI machine), so the effect is measured in
    benchmarks/bench_train.py, not asserted."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        assert perf.keep_freed_memory(True) is False
        return
    try:
        assert perf.keep_freed_memory(True) is True
        assert perf.keep_freed_memory(False) is True  # glibc's defaults restored
        monkeypatch.setenv("SR_KEEP_FREED_MEMORY", "0")
        assert perf.keep_freed_memory(True) is False  # the opt-out
    finally:
        perf.keep_freed_memory(False)
