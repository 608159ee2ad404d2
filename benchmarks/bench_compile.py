"""The optional ``module.compile=true`` flag: what torch.compile costs (the cold compile, paid at the first
step) and what it buys (steady-state examples/s), for the framework's Lightning path in one process.

The inductor cache is a fresh temporary folder, so the compile is as cold as on a new machine; a second
process on the same machine reuses ``TORCHINDUCTOR_CACHE_DIR`` and compiles far faster.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

from bench_train import run_framework
from common import StepClock, compose, framework, main, throughput


def run(quick: bool = False) -> dict:
    warmup, windows, window = (1, 1, 2) if quick else (4, 2, 12)
    overrides = ["callbacks.early_stopping=null"]
    if quick:  # compiling MiniLM takes minutes on a busy machine: check the code path on a tiny BERT
        from tests.helpers import make_tiny_bert

        overrides += ["model=local", f"model.path={make_tiny_bert(Path(tempfile.mkdtemp()) / 'tiny')}"]
    cfg = compose(overrides)
    ctx = framework(cfg)
    base = copy.deepcopy(ctx.model)
    steps_per_epoch = len(ctx.data.train_dataloader())
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for name, compile_flag in (("eager (module.compile=false, default)", False),
                                   ("torch.compile, cold cache (module.compile=true)", True),
                                   ("torch.compile, second fit in the same process", True)):
            clock = StepClock(warmup, windows, window)
            clock.marks.add(1)
            t = time.perf_counter()
            run_framework(ctx, base, clock, compile=compile_flag)
            first = clock.times[1] - t
            rows.append({"path": name, "start to first step end s": first,
                         "examples/s (steady)": throughput(clock.window_stats())})
            print(f"{name}: first step after {first:.1f} s, {rows[-1]['examples/s (steady)']:.1f} examples/s", flush=True)
    eager = rows[0]
    bs = int(cfg.data.batch_size)
    for r in rows:
        r["vs eager"] = r["examples/s (steady)"] / eager["examples/s (steady)"]
        per_step = bs / r["examples/s (steady)"]
        r["est. 3-epoch fit s"] = r["start to first step end s"] + 3 * steps_per_epoch * per_step
    notes = [f"estimated 3-epoch fit = time to the first step + 3 x {steps_per_epoch} steps at the steady rate "
             "(validation excluded); compile pays off only where it is lower than eager's"]
    return {"title": "torch.compile flag (framework training path)", "tables": [{"rows": rows}], "notes": notes,
            "summary": {r["path"]: r["examples/s (steady)"] for r in rows}}


if __name__ == "__main__":
    main("compile", run)
