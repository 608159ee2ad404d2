"""Process-wide settings that must be in place before transformers/torch are imported."""

from __future__ import annotations

import logging
import os
import warnings


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
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
