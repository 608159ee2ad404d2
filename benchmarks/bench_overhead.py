"""The framework's own overhead over a plain loop, each contender run in a fresh process.

Inside one process the step time of either contender depends on the heap that earlier runs left behind,
not on its code: measured here on one thread, the same framework step took 349 ms after one run order
and 259 ms after the other (6,500 against 400 page faults per step), and the plain loop moved the same
way. So this benchmark starts a new interpreter for every run (set-up, warm-up steps, timed steps on the
batches of that pair's seed), alternates which contender goes first, and reports the median over pairs
of framework step / plain step, matched step by step on identical batches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import main, median

HERE = Path(__file__).resolve().parent
NAMES = ["framework (Lightning)", "plain loop, same batches"]


def child(index: int, seed: int, warmup: int, steps: int) -> None:
    """One run in this fresh process; prints the timed step durations as JSON."""
    import copy

    import bench_train as bt
    from common import StepClock, compose, framework

    cfg = compose(["callbacks.early_stopping=null"])
    ctx = framework(cfg)
    ctx.data.seed = seed
    clock = StepClock(warmup, 1, steps)
    bt.CONTENDERS[NAMES[index]](ctx, copy.deepcopy(ctx.model), clock)
    print("STEPS " + json.dumps(clock.step_seconds()), flush=True)


def one(index: int, seed: int, warmup: int, steps: int) -> list[float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(index), str(seed), str(warmup), str(steps)]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STEPS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{NAMES[index]} (seed {seed}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(line[len("STEPS "):])


def run(quick: bool = False, pairs: str | None = None, steps: str | None = None) -> dict:
    n_pairs = int(pairs or (1 if quick else 6))
    warmup, n_steps = (2, 3) if quick else (5, int(steps or 40))
    rows, ratios, diffs = [], [], []
    for p in range(n_pairs):
        order = [0, 1] if p % 2 == 0 else [1, 0]
        times = {}
        for i in order:
            times[i] = one(i, seed=p, warmup=warmup, steps=n_steps)
            print(f"pair {p + 1}/{n_pairs} {NAMES[i]}: median step {1000 * median(times[i]):.1f} ms", flush=True)
        fw, plain = times[0], times[1]
        paired = [f / q for f, q in zip(fw, plain)]
        ratios.append(median(paired))
        diffs += [1000 * (f - q) for f, q in zip(fw, plain)]
        rows.append({"pair (seed)": p, "first": NAMES[order[0]].split(" ")[0], "framework step ms": 1000 * median(fw),
                     "plain step ms": 1000 * median(plain), "framework / plain (paired median)": ratios[-1]})
    overhead = median(ratios) - 1
    notes = [f"framework overhead over the plain loop: **{100 * overhead:+.1f} %** per step (median over {n_pairs} "
             f"pairs of the paired-step median ratio; {median(diffs):+.1f} ms median paired difference)",
             f"each run: a fresh process, {warmup} warm-up steps, {n_steps} timed steps of batch 32 on the batches of "
             "the pair's seed; the first contender alternates between pairs"]
    return {"title": "Framework overhead over the plain loop (fresh process per run)", "tables": [{"rows": rows}],
            "notes": notes, "summary": {"overhead": overhead, "extra_ms": median(diffs), "pairs": n_pairs}}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*map(int, sys.argv[2:6]))
    else:
        main("overhead", run)
