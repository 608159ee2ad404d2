"""The ``module.compile=true`` flag: what torch.compile costs (the compile, paid at the first step) and what it
buys (steady-state examples/s), for the framework's Lightning path.

Rows, each a fit of the composed default (and of a head-pruned model: another shape class, another graph):
- eager (``module.compile=false``);
- compiled, cold: an empty inductor cache, as on a new machine;
- compiled, warm cache, fresh process: a second process on the same machine with the cache the cold row filled
  (the project keeps it under ``${paths.cache_dir}/compile``): what every later ``make run`` and every later
  grid job in its own process (SLURM, joblib) pays;
- compiled, same process: a second fit in the process that already compiled (a basic-launcher grid runs its
  jobs in one process, so its later jobs of the same shape class pay this).

The estimated 3-epoch fit (time to the first step + 3 epochs of steps at the steady rate) says where compile
pays: only where it is lower than eager's.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import run_framework
from common import StepClock, compose, framework, main, throughput

HERE = Path(__file__).resolve().parent


def _overrides(quick: bool) -> list[str]:
    overrides = ["callbacks.early_stopping=null"]
    if quick:  # compiling MiniLM takes minutes on a busy machine: check the code path on a tiny BERT
        from tests.helpers import make_tiny_bert

        overrides += ["model=local", f"model.path={make_tiny_bert(Path(tempfile.mkdtemp()) / 'tiny')}"]
    return overrides


def _prune(model, fraction: float) -> None:
    """Remove the same share of heads in every layer (a head-pruning shape class, as compressor=pr* makes)."""
    from subgroup_robustness.models.structure import attention_blocks
    from subgroup_robustness.models.surgery import prune_heads

    keep = [list(range(max(1, round((1 - fraction) * int(b.self.num_attention_heads))))) for b in attention_blocks(model)]
    prune_heads(model, keep)


def fit(ctx, base, compile_flag: bool, warmup: int, windows: int, window: int) -> dict:
    clock = StepClock(warmup, windows, window)
    clock.marks.add(1)
    t = time.perf_counter()
    run_framework(ctx, base, clock, compile=compile_flag)
    return {"first": clock.times[1] - t, "rate": throughput(clock.window_stats())}


def child(cache: str, quick: bool, shape: str) -> None:
    """``--child``: one compiled fit in this fresh process, with the cache at ``cache``; prints JSON."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    warmup, windows, window = (1, 1, 2) if quick else (4, 2, 12)
    ctx = framework(compose(_overrides(quick)))
    base = copy.deepcopy(ctx.model)
    if shape == "pruned":
        _prune(base, 0.4)
    print("RESULT " + json.dumps(fit(ctx, base, True, warmup, windows, window)), flush=True)


def _fresh_process(cache: str, quick: bool, shape: str) -> dict:
    cmd = [sys.executable, str(HERE / "bench_compile.py"), "--child", cache, shape] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE.parent,
                         env={**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the fresh-process compile failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run(quick: bool = False) -> dict:
    warmup, windows, window = (1, 1, 2) if quick else (4, 2, 12)
    cfg = compose(_overrides(quick))
    ctx = framework(cfg)
    steps_per_epoch = len(ctx.data.train_dataloader())
    bs = int(cfg.data.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for shape in ("default", "pruned"):
            base = copy.deepcopy(ctx.model)
            if shape == "pruned":
                _prune(base, 0.4)
            name = str(cfg.model.get("name", "model"))
            label = name if shape == "default" else f"{name}, 40 % of heads pruned (pr40's shape)"
            measured = [("eager (module.compile=false)", fit(ctx, base, False, warmup, windows, window)),
                        ("compiled, cold cache", fit(ctx, base, True, warmup, windows, window)),
                        ("compiled, warm cache, fresh process", _fresh_process(cache, quick, shape)),
                        ("compiled, same process again", fit(ctx, base, True, warmup, windows, window))]
            eager = measured[0][1]
            for name, m in measured:
                est = m["first"] + 3 * steps_per_epoch * bs / m["rate"]
                eager_est = eager["first"] + 3 * steps_per_epoch * bs / eager["rate"]
                rows.append({"model": label, "path": name, "start to first step end s": m["first"],
                             "examples/s (steady)": m["rate"], "vs eager": m["rate"] / eager["rate"],
                             "est. 3-epoch fit s": est, "pays": "—" if name.startswith("eager") else
                             ("yes" if est < eager_est else "no")})
                print(f"{label} / {name}: first step after {m['first']:.1f} s, {m['rate']:.1f} examples/s", flush=True)
    notes = [f"estimated 3-epoch fit = time to the first step + 3 x {steps_per_epoch} steps of batch {bs} at the "
             "steady rate (validation excluded); compile pays only where it is lower than eager's",
             "cold: an empty TORCHINDUCTOR_CACHE_DIR; warm: the same folder in a new process (the framework keeps it "
             "under ${paths.cache_dir}/compile); same process: dynamo's in-memory graphs of the first compile"]
    return {"title": "torch.compile flag (framework training path)", "tables": [{"rows": rows}], "notes": notes,
            "summary": {f"{r['model']} / {r['path']}": r["examples/s (steady)"] for r in rows},
            "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], "--quick" in sys.argv, sys.argv[3])
    else:
        main("compile", run)
