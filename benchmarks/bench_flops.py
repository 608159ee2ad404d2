"""Achieved GFLOP/s of a training step against the machine's measured matrix-product peak, fp32 and bf16.

The peak is measured here, now (matrix products of a MiniLM layer's shapes), so a busy machine lowers
both sides alike. A step's FLOPs count the padded tokens it actually computes (common.train_flops).
"""

from __future__ import annotations

import copy

from common import (NO_BF16, StepClock, compose, cycle, framework, main, matmul_peak, native_bf16, plain_train,
                    train_flops)


def run(quick: bool = False) -> dict:
    warmup, windows, window = (1, 1, 2) if quick else (4, 3, 8)
    cfg = compose(["callbacks.early_stopping=null"])
    ctx = framework(cfg)
    dtypes = ("fp32", "bf16") if native_bf16() else ("fp32",)
    peaks = {d: matmul_peak(d, seconds=0.05 if quick else 0.2, repeats=2 if quick else 5) for d in dtypes}
    rows = []
    for dtype in dtypes:
        precision = {"fp32": "32-true", "bf16": "bf16-mixed"}[dtype]
        clock = StepClock(warmup, windows, window)
        model = copy.deepcopy(ctx.model)
        plain_train(model, cycle(ctx.data.train_dataloader), clock, precision=precision, lr=float(cfg.module.lr))
        stats = clock.window_stats()
        rates = []
        for s in stats:
            flops = sum(train_flops(model, b, t) for b, t in s["shapes"])
            rates.append(flops / s["seconds"] / 1e9)
        achieved = sorted(rates)[len(rates) // 2]
        ex = sum(s["examples"] for s in stats) / sum(s["seconds"] for s in stats)
        rows.append({"step precision": precision, "examples/s": ex, "achieved GFLOP/s": achieved,
                     "matmul peak GFLOP/s (same dtype)": peaks[dtype]["peak"],
                     "% of same-dtype peak": 100 * achieved / peaks[dtype]["peak"],
                     "% of fp32 peak": 100 * achieved / peaks["fp32"]["peak"]})
        print(f"{precision}: {achieved:.0f} GFLOP/s", flush=True)
    shapes = [{"matmul (M x K x N)": k, **{f"{d} GFLOP/s": peaks[d][k] for d in dtypes}}
              for k in peaks["fp32"] if k != "peak"]
    notes = [
        "the step is the framework's (bucketed batches of the composed default, fused AdamW, clipping); FLOPs = "
        "6 x encoder params x padded tokens + attention products; embedding lookups and the optimizer count zero",
        "the gap to the peak is the work that is not a large matrix product: LayerNorm, GELU, softmax, dropout, "
        "autocast casts, the dense 30k x 384 embedding gradient and the AdamW update over all 22.7M weights",
        *([] if native_bf16() else [f"fp32 only: {NO_BF16}"]),
    ]
    return {"title": "Achieved training GFLOP/s vs the measured matmul peak", "notes": notes,
            "tables": [{"rows": rows}, {"caption": "Measured matrix-product rates:", "rows": shapes}],
            "summary": {**{f"{d}_peak": peaks[d]["peak"] for d in dtypes},
                        **{r["step precision"]: r["achieved GFLOP/s"] for r in rows}}}


if __name__ == "__main__":
    main("flops", run)
