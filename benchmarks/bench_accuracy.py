"""Does the fast path change results? One epoch of fine-tuning through the framework in fp32 and in the
auto-detected precision (bf16 autocast on this CPU), same data, same seed, then both are tested.

"Within noise" is judged against the binomial standard error of a test accuracy, and the two models'
prediction agreement is printed too. ``--set save=DIR`` keeps the fast path's model for bench_eval.py.
"""

from __future__ import annotations

import copy
import math
import time

from common import NO_BF16, compose, framework, main


def train_and_test(ctx, base, precision: str, epochs: int) -> dict:
    from hydra.utils import instantiate

    ctx.cfg.trainer.precision = precision  # fit and evaluation both run in this precision
    ctx.model = copy.deepcopy(base)
    ctx.model.train()
    module = instantiate(ctx.cfg.module)(model=ctx.model, objective=instantiate(ctx.cfg.objective))
    t = time.perf_counter()
    trainer = ctx.trainer(training=True, max_epochs=epochs, min_epochs=epochs)
    trainer.fit(module, datamodule=ctx.data)
    fit_s = time.perf_counter() - t
    evals = ctx.evaluate(module, f"eval_{precision}")
    test = evals["metrics"]["test"]
    return {"precision": precision, "fit s": fit_s, "steps": trainer.global_step,
            "examples/s (whole fit)": trainer.global_step * ctx.cfg.data.batch_size / fit_s,
            "val acc_avg": evals["metrics"]["val"]["val/acc_avg"], "test acc_avg": test["test/acc_avg"],
            "test acc_wg": test["test/acc_wg"], "_preds": evals["predictions"], "_model": ctx.model}


def run(quick: bool = False, save: str | None = None, epochs: str = "1") -> dict:
    overrides = ["callbacks.early_stopping=null"]
    if quick:
        overrides += ["dataset.subsample={train:256,val:128,test:128}"]
    cfg = compose(overrides)
    ctx = framework(cfg)
    base = copy.deepcopy(ctx.model)
    fast = str(cfg.trainer.precision)
    if fast == "32-true":
        # nothing to compare: the fast path trains in fp32 here. One fp32 fit still gives bench_eval its model.
        result = train_and_test(ctx, base, fast, int(epochs))
        if save:
            result["_model"].save_pretrained(save, safe_serialization=True)
        return {"title": f"Accuracy of the fast path: {epochs} epoch(s), fp32 only", "notes": [
                    f"the fast path is fp32 on this machine, so there is no precision to compare: {NO_BF16}"],
                "tables": [{"rows": [{k: v for k, v in result.items() if not k.startswith("_")}]}],
                "summary": {"not_applicable": "the auto precision is 32-true on this CPU: the fast path is fp32"}}
    results = [train_and_test(ctx, base, p, int(epochs)) for p in ("32-true", fast)]
    a, b = (r["_preds"] for r in results)
    agree = float((a[:, 2] == b[:, 2]).float().mean())
    n = len(a)
    p = results[0]["test acc_avg"]
    se = math.sqrt(p * (1 - p) / n)
    diff = results[1]["test acc_avg"] - results[0]["test acc_avg"]
    if save:
        results[1]["_model"].save_pretrained(save, safe_serialization=True)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    notes = [
        f"test acc_avg {fast} - fp32 = {100 * diff:+.2f} points; one binomial standard error on {n} test examples is "
        f"{100 * se:.2f} points -> {'within' if abs(diff) <= 2 * se else 'OUTSIDE'} 2 SE",
        f"prediction agreement between the two models on the test split: {100 * agree:.1f} %",
        f"fit speed-up of {fast} over fp32 (whole epochs, incl. validation): "
        f"{results[1]['examples/s (whole fit)'] / results[0]['examples/s (whole fit)']:.2f}x",
    ]
    return {"title": f"Accuracy of the fast path: {epochs} epoch(s) fp32 vs {fast}", "tables": [{"rows": rows}],
            "notes": notes, "summary": {"diff": diff, "se": se, "agreement": agree, "within_2se": abs(diff) <= 2 * se}}


if __name__ == "__main__":
    main("accuracy", run)
