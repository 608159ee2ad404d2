"""The launcher classes Hydra instantiates (``_target_`` of conf/hydra/launcher/*.yaml). Thin: the planning,
ordering, SLURM submission and outcome recording live in ``subgroup_robustness.launchers``. Imported at
every Hydra start-up (plugin discovery), so nothing heavy is imported here."""

from __future__ import annotations

from typing import Any, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from subgroup_robustness import launchers as _impl


class BasicGraphLauncher(BasicLauncher):
    """Hydra's basic launcher (one job after the other, in this process) on the planned job graph:
    complete jobs and jobs live elsewhere are not run; base fine-tunes run first."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return _impl.launch_basic(self, job_overrides, initial_job_idx)


class JoblibGraphLauncher(JoblibLauncher):
    """hydra-joblib-launcher on the planned job graph: base fine-tunes in parallel first, then the jobs
    that start from them; no per-job progress bar when workers run side by side."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return _impl.launch_joblib(self, job_overrides, initial_job_idx)


class SlurmGraphLauncher(_impl.SlurmLauncherBase, BaseSubmititLauncher):
    """hydra-submitit-launcher's SLURM launcher on the planned job graph: one named sbatch per job, SLURM
    dependencies on base fine-tunes, SLURM's outcomes recorded, bounded requeue on timeout/preemption."""

    _EXECUTOR = "slurm"

    def __init__(self, **params: Any) -> None:
        BaseSubmititLauncher.__init__(self, **self._init_own(dict(params)))

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict, attempt: int = 0) -> Any:
        return _impl.run_slurm_job(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state, attempt)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return _impl.launch_slurm(self, job_overrides, initial_job_idx)
