"""The thin task entry: ``python -m subgroup_robustness [overrides]``."""

from __future__ import annotations

import logging
import math
import sys

import hydra
from omegaconf import DictConfig

from subgroup_robustness.utils.resolvers import register

register()
log = logging.getLogger(__name__)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _user_error(exc: BaseException):
    """The UserError behind an exception, if any (Hydra's instantiate wraps what constructors raise)."""
    from subgroup_robustness.utils.errors import UserError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def task(cfg: DictConfig) -> float:
    from subgroup_robustness.experiment import run
    from subgroup_robustness.utils.console import error, print_config_tree
    from subgroup_robustness.utils.errors import UserError

    if cfg.get("print_config", True):
        print_config_tree(cfg)
    try:
        record = run(cfg)
    except UserError as exc:
        error(str(exc))
        if _is_multirun():
            return math.nan  # recorded in results.json; the other jobs go on
        sys.exit(2)
    except Exception as exc:
        if (user := _user_error(exc)) is not None:
            error(str(user))
            if _is_multirun():
                return math.nan
            sys.exit(2)
        if _is_multirun():
            error(f"job failed ({type(exc).__name__}: {exc}); recorded in results.json, the sweep goes on")
            log.exception("job failed")
            return math.nan
        raise
    value = record.get("metrics", {}).get("val", {}).get(cfg.get("optimized_metric", "val/acc_wg"))
    return float(value) if value is not None else math.nan


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return task(cfg)


if __name__ == "__main__":
    main()
