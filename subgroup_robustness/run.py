"""The thin task entry: ``python -m subgroup_robustness [overrides]``.

Order: check the config (one line per problem, before anything is printed or loaded), print the config
tree, run. A user error exits 2 with one line (or, inside a multirun, is recorded and the sweep goes on)."""

from __future__ import annotations

import logging
import math
import sys

import hydra
from omegaconf import DictConfig

from subgroup_robustness.utils.resolvers import register

log = logging.getLogger(__name__)


def _record_config_error(cfg: DictConfig, message: str) -> None:
    """A job refused before it started still leaves a results.json saying why (the sweep summary reads it)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from subgroup_robustness.results import RESULTS_FILE, base_record, is_completed, write_results

    try:
        out = Path(OmegaConf.select(cfg, "paths.output_dir"))
        if is_completed(out / RESULTS_FILE):
            return  # never downgrade a finished result
        rec = base_record("", {"compressor": str(OmegaConf.select(cfg, "compressor.name", default="?")),
                               "seed": OmegaConf.select(cfg, "seed", default=None)}, {})
        rec.update(status="failed", output_dir=str(out),
                   error={"type": "ConfigError", "message": message, "traceback": ""})
        write_results(out / RESULTS_FILE, rec)
    except Exception:  # noqa: BLE001 - the error line itself is what matters
        pass


def _die_with_parent() -> None:
    """A local parallel worker (joblib/loky) must not outlive the sweep that started it: after a kill -9
    of the sweep, orphaned workers finished two jobs and started a new one, still alive 85 s later. A
    daemon thread watches the parent PID and ends this worker (SIGTERM: the run records it) once the
    parent is gone. Only for joblib workers: a single run started with nohup must survive its shell."""
    import os
    import signal
    import threading
    import time

    from hydra.core.hydra_config import HydraConfig

    try:
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    except ValueError:
        return
    if "joblib" not in launcher.lower():
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sr-parent-watch", daemon=True).start()


def _config_tree_to_job_log(cfg: DictConfig) -> None:
    """Multirun: the full config tree goes to the job's log file (<job folder>/<job name>.log), so ~90 lines
    per job do not bury the sweep's progress lines."""
    import io
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from rich.console import Console

    from subgroup_robustness.utils.console import print_config_tree

    try:
        hc = HydraConfig.get()
        buf = io.StringIO()
        print_config_tree(cfg, out=Console(file=buf, width=120, no_color=True, highlight=False))
        with open(Path(hc.runtime.output_dir) / f"{hc.job.name}.log", "a", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
    except Exception:  # noqa: BLE001 - a convenience, never a reason to fail a job
        pass


def task(cfg: DictConfig) -> float:
    from subgroup_robustness.experiment import run
    from subgroup_robustness.preflight import check_config
    from subgroup_robustness.utils.compose import is_multirun
    from subgroup_robustness.utils.console import error, print_config_tree
    from subgroup_robustness.utils.errors import user_error

    multirun = is_multirun()
    if multirun:
        _die_with_parent()
    started = False
    try:
        check_config(cfg)
        if cfg.get("print_config", True):
            if multirun:
                _config_tree_to_job_log(cfg)  # the console gets the sweep's one-line job header
            else:
                print_config_tree(cfg)
        started = True
        record = run(cfg)
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        error("interrupted: the job is recorded as 'interrupted' in its results.json; relaunch the same command "
              "to run it (finished jobs are skipped)")
        sys.exit(130)  # stops a sweep too: Ctrl-C means stop, not "next job"
    except Exception as exc:
        if (user := user_error(exc)) is not None:
            error(str(user))
            if not started:
                _record_config_error(cfg, str(user))
            if multirun:
                return math.nan  # recorded in results.json; the other jobs go on
            sys.exit(2)
        if multirun:
            error(f"job failed ({type(exc).__name__}: {exc}); recorded in results.json, the sweep goes on")
            log.exception("job failed")
            return math.nan
        raise
    value = record.get("metrics", {}).get("val", {}).get(cfg.get("optimized_metric", "val/acc_wg"))
    return float(value) if value is not None else math.nan


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> float:
    return task(cfg)


def main() -> None:
    register()  # resolvers before Hydra composes (no import-time side effects)
    _main()


if __name__ == "__main__":
    main()
