"""Evaluation throughput and prediction agreement of one fine-tuned model run several ways: fp32,
bf16 autocast, ``dq`` (torch.ao dynamic int8, the paper's quantizer), ``sq`` (static int8: the framework's
calibrated torchao path, eager and under torch.compile), torchao int8 dynamic-activation weights, and the
framework's Lightning ``test`` loop (fp32, bf16 and the dq model).

The model is the one bench_accuracy.py fine-tuned (``--set weights=DIR``), or else a short fine-tuning
here, so that the predictions mean something. Batches are the framework's test batches (64, sorted by
length); every rate is over the whole RedditBias test split (its first batches alone are the shortest
comments, where per-call overhead hides what int8 saves), as are agreement and accuracy.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings

import torch

from common import NO_BF16, StepClock, compose, cycle, framework, main, native_bf16, plain_train, sync


def predict(model, batches, bf16: bool = False) -> torch.Tensor:
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for b in batches:
            kwargs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            out.append(model(**kwargs).logits.float().argmax(-1))
    return torch.cat(out)


def timed(fn, batches, repeats: int) -> float:
    """Median examples/s over ``repeats`` passes (the caller's prediction pass was the warm-up)."""
    n = sum(len(b["labels"]) for b in batches)
    rates = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn(batches)
        sync()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def dynamic_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def torchao_int8(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def static_int8(model, data, batches: int):
    """The framework's ``sq`` plug-in on a copy of ``model``, calibrated on the first ``batches`` training
    batches; returns the model and the number of calibration examples."""
    from subgroup_robustness.compression.context import SimpleContext
    from subgroup_robustness.compression.quantization import StaticInt8

    sq, ctx = StaticInt8(calibration_batches=batches), SimpleContext(model=copy.deepcopy(model), data=data)
    return sq.apply(ctx).model, sq.report(ctx)["calibration_examples"]


def finetune_briefly(ctx, steps: int):
    model = copy.deepcopy(ctx.model)
    clock = StepClock(steps, 0, 1)
    plain_train(model, cycle(ctx.data.train_dataloader), clock, precision=str(ctx.cfg.trainer.precision),
                lr=float(ctx.cfg.module.lr))
    return model


def run(quick: bool = False, weights: str | None = None, compile: str | None = None) -> dict:
    compile = compile or ("0" if quick else "1")  # a cold compile takes minutes on a busy 2-core machine
    cfg = compose(["callbacks.early_stopping=null"])
    ctx = framework(cfg)
    notes = []
    if weights:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(weights, use_safetensors=True)
        notes.append(f"model: fine-tuned for one epoch by bench_accuracy ({weights})")
    else:
        steps = 3 if quick else 120
        model = finetune_briefly(ctx, steps)
        notes.append(f"model: pretrained MiniLM-L6 fine-tuned here for {steps} steps (no --set weights=DIR given)")
    model.eval()
    test = list(ctx.data.test_dataloader())
    if quick:
        test = test[:3]
    repeats = 1 if quick else 3
    labels = torch.cat([b["labels"] for b in test])

    dq = dynamic_int8(model)
    sq, calibration_examples = static_int8(model, ctx.data, 2 if quick else 16)
    native = native_bf16()
    variants = {
        "fp32": (model, False),
        **({"bf16 autocast": (model, True)} if native else {}),
        "dq: torch.ao dynamic int8": (dq, False),
        "sq: static int8 (torchao, calibrated), eager": (sq, False),
        "torchao int8 dyn. act. + weight, eager": (torchao_int8(model), False),
    }
    compile_s = {}
    if compile == "1":
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as a fresh machine pays it
            for name, (m, bf16) in (("sq + torch.compile", (sq, False)),):
                compiled = torch.compile(m, dynamic=True)
                t = time.perf_counter()
                predict(compiled, test[:1], bf16)
                compile_s[name] = time.perf_counter() - t
                variants[name] = (compiled, bf16)
    rows = []
    ref = predict(model, test)
    for name, (m, bf16) in variants.items():
        preds = predict(m, test, bf16)
        rate = timed(lambda bs, m=m, bf16=bf16: predict(m, bs, bf16), test, repeats)
        rows.append({"variant": name, "examples/s": rate, "agreement with fp32": float((preds == ref).float().mean()),
                     "test accuracy": float((preds == labels).float().mean()),
                     "first-call compile s": compile_s.get(name, float("nan"))})
        print(f"{name}: {rate:.0f} examples/s", flush=True)
    base = rows[0]["examples/s"]
    for r in rows:
        r["vs fp32"] = r["examples/s"] / base

    # the framework's own evaluation: Lightning test loop (inference_mode, GroupMetrics callback)
    from hydra.utils import instantiate

    runs = [("", model, "32-true"), ("", model, str(cfg.trainer.precision)), (", dq model", dq, "32-true")]
    for name, m, precision in dict.fromkeys(runs):  # the auto precision may be 32-true: time that once
        module = instantiate(cfg.module)(model=m, objective=instantiate(cfg.objective))
        trainer = ctx.trainer(training=False, precision=precision, limit_test_batches=len(test))
        t = time.perf_counter()
        trainer.test(module, datamodule=ctx.data, verbose=False)
        secs = time.perf_counter() - t
        n = sum(len(b["labels"]) for b in test)
        rows.append({"variant": f"framework trainer.test ({precision}{name}), incl. set-up", "examples/s": n / secs,
                     "vs fp32": n / secs / base})
    notes.append(f"timed on the whole test split ({len(labels)} examples, batch 64, sorted by length), median of "
                 f"{repeats} passes after the pass that made the predictions; agreement and accuracy over the same "
                 f"examples; sq calibrated on {calibration_examples} training examples")
    if not native:
        notes.append(f"no bf16 autocast row: {NO_BF16}")
    if compile_s:
        notes.append("compile rows: cold inductor cache; the first call's compile time is reported separately "
                     "and is not in examples/s (with dynamic shapes one graph serves every length); the framework "
                     "evaluates eagerly, where a test split of this size never repays a compile")
    return {"title": "Evaluation throughput and agreement (RedditBias test split)", "tables": [{"rows": rows}],
            "notes": notes, "summary": {r["variant"]: r["examples/s"] for r in rows}}


if __name__ == "__main__":
    main("eval", run)
