"""The cluster tests run only against a SLURM cluster someone asked for: ``make test-cluster``
(tests/cluster/cluster.sh test) starts a one-node cluster on this machine, sets ``SR_CLUSTER_TESTS=1`` and
points slurm's commands at it (SLURM_CONF). Without that opt-in they are skipped, so ``make test`` on a
cluster's login node never submits jobs to a real partition. ``SR_CLUSTER_PARTITION`` names the partition
(default: the cluster's default one)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

SKIP_HOW = "run `make test-cluster` (starts a one-node SLURM cluster here, runs these, stops it)"


def cluster_problem() -> str | None:
    if os.environ.get("SR_CLUSTER_TESTS") != "1":
        return f"no test cluster (SR_CLUSTER_TESTS is not 1): {SKIP_HOW}"
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed: {SKIP_HOW}"
    part = os.environ.get("SR_CLUSTER_PARTITION")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T", *(["-p", part] if part else [])], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed ({exc}): {SKIP_HOW}"
    if out.returncode != 0:
        return f"no SLURM controller answers (sinfo: {out.stderr.strip()[:200]}): {SKIP_HOW}"
    if not any(w in out.stdout for w in ("idle", "mixed", "allocated")):
        return f"no usable node (sinfo: {out.stdout.strip()[:200]!r}): {SKIP_HOW}"
    return None


def pytest_collection_modifyitems(config, items):
    problem = None
    checked = False
    for item in items:
        if "cluster" not in item.keywords:
            continue
        if not checked:
            problem, checked = cluster_problem(), True
        if problem:
            item.add_marker(pytest.mark.skip(reason=problem))
