"""Process-wide settings that must be in place before transformers/torch are imported."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator


def quiet_third_party() -> None:
    """Keep deprecation noise of torch.ao / torchao / transformers out of the user's console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the hub: fail fast instead of retrying for minutes when there is no network
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    for pattern in (
        r".*torch\.ao\.quantization.*deprecated.*",
        r".*quantize_per_tensor.*deprecated.*",
        r".*_pytree.*register_constant.*",
        r".*does not have many workers.*",
        r".*The number of training batches.*",
        r".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    for name in ("torch.utils._pytree", "torchao", "transformers.modeling_utils", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading our own or a known checkpoint: transformers' load report ("newly initialized: classifier.*"),
    tensor-parallel notes and progress bars are not news (what matters is recorded in results.json)."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("transformers", "transformers.modeling_utils")]
    levels, bars = [lg.level for lg in loggers], hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars:
            hf_logging.enable_progress_bar()
