#!/usr/bin/env bash
# GPU readiness check: fine-tune MiniLM-L6 on RedditBias through the framework on one GPU for a few
# hundred steps; report examples/s and achieved TFLOP/s against the card's measured matmul peak, and
# run the default experiment end to end on the GPU. Under 5 minutes on an H100/H200.
#
# Two steps, because the GPU machine has no network:
#   1. here (the dev machine, venv installed):   bash benchmarks/gpu_check.sh --prepare
#      writes .cache/gpu_bundle/ (~52 MB, git-ignored): the three pure-Python wheels the GPU image lacks
#      (hydra-core, omegaconf, antlr4 runtime), MiniLM-L6's weights stored in bf16 (45 MB; loaded back
#      as fp32) with its tokenizer, and the five RedditBias CSVs.
#   2. on the GPU machine, with .cache/gpu_bundle carried along:   bash benchmarks/gpu_check.sh
#      results: $OUT/gpu_check.{md,json,log} (OUT defaults to /tmp/sr-gpu-check).
#
# Why no venv there: the GPU image's python3 is itself a virtualenv holding the CUDA build of torch,
# transformers and lightning; a venv made from it would not see them (venvs inherit the *base*
# interpreter's site-packages), and the project's torch==2.13.0 pin is a CPU wheel. So the check uses
# that python3 as it is and installs the missing wheels into a private --target folder on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.cache/gpu_bundle

if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels"
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
EOF
)
  # antlr4-python3-runtime 4.9.3 is published as an sdist only: build its (pure-Python) wheel here
  "$PY" -m pip wheel --quiet --no-deps -w "$BUNDLE/wheels" $pins
  "$PY" benchmarks/gpu_check.py --prepare "$BUNDLE"
  du -sh "$BUNDLE"
  echo "ready: carry $BUNDLE to the GPU machine and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

[[ -d "$BUNDLE/wheels" ]] || { echo "no $BUNDLE: run 'bash benchmarks/gpu_check.sh --prepare' on the dev machine first" >&2; exit 2; }
OUT=${OUT:-/tmp/sr-gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 - <<'EOF'
import sys, torch, transformers, lightning
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}")
if not torch.cuda.is_available():
    sys.exit("torch sees no GPU")
print("GPU:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
EOF
SITE=/tmp/sr-gpu-site
python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" SR_CACHE_DIR="$PWD/$BUNDLE/cache" \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --bundle "$BUNDLE" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
