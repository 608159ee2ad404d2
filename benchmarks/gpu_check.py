"""The GPU half of benchmarks/gpu_check.sh (see there for how to run it).

``--prepare BUNDLE`` (dev machine): MiniLM-L6 in bf16 + tokenizer, the RedditBias CSVs.
``--bundle BUNDLE --out DIR`` (GPU machine): measured matmul peak; training throughput and achieved
TFLOP/s of the framework's Lightning path (trainer=gpu, bf16-mixed) against a plain loop on the same
batches and the HF Trainer; batch 256 and torch.compile variants; evaluation fp32 vs bf16; then the
default experiment end to end on the GPU (fit, validation, test, results.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGET_S = 270  # the whole check stays under ~5 minutes: later parts are skipped past this


def prepare(bundle: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from common import compose
    from subgroup_robustness.data.sources import redditbias
    from subgroup_robustness.models.loading import resolve_model_path

    cfg = compose([])
    weights, tok_path = resolve_model_path(cfg.model)
    out = bundle / "model"
    model = AutoModel.from_pretrained(weights, use_safetensors=True).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    conf = json.loads((out / "config.json").read_text())
    conf["dtype"] = "float32"  # loaded back as fp32: training keeps fp32 master weights, as on CPU
    conf.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    AutoTokenizer.from_pretrained(tok_path).save_pretrained(out)
    src = redditbias.fetch(Path(cfg.paths.data_dir) / "redditbias")
    dst = bundle / "cache" / "data" / "redditbias"
    for rel in [*redditbias.FILES.values(), "LICENSE"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    print(f"bundle: {bundle} (model in bf16 from {weights}; RedditBias from {src})")


def tflops(model, stats) -> float:
    from common import train_flops

    secs = sum(s["seconds"] for s in stats)
    return sum(train_flops(model, b, t) for s in stats for b, t in s["shapes"]) / secs / 1e12 if secs else float("nan")


def check(bundle: Path, dry_run: bool = False) -> dict:
    """``dry_run``: the same code on the CPU with a few steps each, to test this script off the GPU."""
    import torch

    from bench_train import run_framework, run_hf
    from common import StepClock, compose, cycle, framework, machine, matmul_peak, plain_train, throughput

    device = "cpu" if dry_run else "cuda"
    trainer_cfg = "trainer=cpu" if dry_run else "trainer=gpu"
    steps = (lambda w, n, k: StepClock(1, 1, 2)) if dry_run else StepClock
    t_start = time.perf_counter()
    report: dict = {"machine": machine(), "throughput": [], "eval": [], "errors": []}
    peak = {d: matmul_peak(d, seconds=0.05 if dry_run else 0.5, repeats=5)["peak"] / 1000 for d in ("bf16", "fp32")}
    report["peak_tflops"] = peak
    print(f"measured matmul peak: bf16 {peak['bf16']:.0f} TFLOP/s, fp32 {peak['fp32']:.1f} TFLOP/s", flush=True)

    model_args = ["model=local", f"model.path={bundle / 'model'}"]
    cfg = compose([trainer_cfg, *model_args, "callbacks.early_stopping=null"])
    ctx = framework(cfg)
    base = copy.deepcopy(ctx.model)
    no_val = {"limit_val_batches": 0}

    def record(name, clock, model, extra=None):
        stats = clock.window_stats()
        row = {"contender": name, "batch": stats[0]["shapes"][0][0] if stats else None,
               "examples/s": throughput(stats), "achieved TFLOP/s": tflops(model, stats)}
        row["% of bf16 peak"] = 100 * row["achieved TFLOP/s"] / peak["bf16"]
        row.update(extra or {})
        report["throughput"].append(row)
        print(f"{name}: {row['examples/s']:.0f} examples/s, {row['achieved TFLOP/s']:.2f} TFLOP/s", flush=True)

    def attempt(name, fn):
        if time.perf_counter() - t_start > BUDGET_S and not dry_run:
            report["errors"].append(f"{name}: skipped (time budget)")
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every part reports, one failure must not hide the rest
            report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()

    def framework_run(name, clock, batch=None, **module_overrides):
        ctx.data.batch_size = batch or int(cfg.data.batch_size)
        t = time.perf_counter()
        clock.marks.add(1)
        run_framework(ctx, base, clock, trainer_overrides=no_val, **module_overrides)
        record(name, clock, base, {"first step s": clock.times[1] - t})
        ctx.data.batch_size = int(cfg.data.batch_size)

    def plain_run():
        clock = steps(20, 3, 50)
        model = copy.deepcopy(base).to(device)
        plain_train(model, cycle(ctx.data.train_dataloader), clock, precision=str(cfg.trainer.precision),
                    lr=float(cfg.module.lr))
        record(f"plain loop, same batches ({cfg.trainer.precision})", clock, base)

    def hf_run():
        clock = steps(20, 3, 50)
        run_hf(ctx, base, clock)
        record("HF Trainer (defaults: fp32, random batches)", clock, base)

    attempt("framework b32", lambda: framework_run(f"framework, Lightning ({cfg.trainer.precision})", steps(20, 3, 50)))
    attempt("plain b32", plain_run)
    attempt("hf b32", hf_run)
    attempt("framework b256", lambda: framework_run("framework, batch 256", steps(10, 3, 20), batch=256))
    rows = {r["contender"]: r for r in report["throughput"]}
    fw = next((r for k, r in rows.items() if k.startswith("framework, Lightning")), None)
    pl = next((r for k, r in rows.items() if k.startswith("plain loop")), None)
    hf = next((r for k, r in rows.items() if k.startswith("HF Trainer")), None)
    if fw and pl:
        report["overhead_vs_plain"] = 1 - fw["examples/s"] / pl["examples/s"]
    if fw and hf:
        report["speedup_vs_hf"] = fw["examples/s"] / hf["examples/s"]

    def eval_run():
        from bench_eval import timed

        model = copy.deepcopy(base).to(device).eval()
        test = [{k: v.to(device) for k, v in b.items()} for b in ctx.data.test_dataloader()]
        test = test[:2] if dry_run else test
        for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
            def fn(bs, bf16=bf16):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), torch.inference_mode():
                    for b in bs:
                        model(**{k: b[k] for k in ("input_ids", "attention_mask") if k in b})
            report["eval"].append({"variant": name, "examples/s": timed(fn, test, 1 if dry_run else 3)})

    attempt("eval", eval_run)

    def end_to_end():
        from hydra.core.hydra_config import HydraConfig  # noqa: F401 - compose() sets it

        from subgroup_robustness.experiment import run
        from subgroup_robustness.preflight import check_config

        with tempfile.TemporaryDirectory() as tmp:
            extra = ["debug=fdr"] if dry_run else []
            run_cfg = compose([trainer_cfg, *model_args, "print_config=false", *extra], out_dir=tmp)
            t = time.perf_counter()
            check_config(run_cfg)  # as the entry point does: the config completed and checked first
            rec = run(run_cfg)
            report["end_to_end"] = {"status": rec["status"], "wall s": time.perf_counter() - t,
                                    "test acc_avg": rec["metrics"]["test"]["test/acc_avg"],
                                    "test acc_wg": rec["metrics"]["test"]["test/acc_wg"],
                                    "epochs": rec["phases"][0]["epochs"], "timing": rec.get("timing")}

    attempt("end-to-end default experiment (trainer=gpu)", end_to_end)
    if not dry_run:  # a cold compile costs about a minute on a CPU too
        attempt("framework + torch.compile", lambda: framework_run("framework + torch.compile (cold)",
                                                                    steps(20, 3, 50), compile=True))
    report["seconds"] = time.perf_counter() - t_start
    return report


def markdown(report: dict) -> str:
    from common import table

    m = report["machine"]
    lines = [f"# GPU check: {m.get('gpu')} — {m['date']}", "",
             f"torch {m['torch']}, transformers {m['transformers']}, lightning {m['lightning']}, Python {m['python']}; "
             f"measured matmul peak bf16 {report['peak_tflops']['bf16']:.0f} TFLOP/s, fp32 {report['peak_tflops']['fp32']:.1f}",
             "", "## Training (MiniLM-L6, RedditBias, lr 2e-5)", "", table(report["throughput"])]
    if "speedup_vs_hf" in report:
        lines.append(f"- framework / HF Trainer: {report['speedup_vs_hf']:.2f}x")
    if "overhead_vs_plain" in report:
        lines.append(f"- framework overhead over the plain loop: {100 * report['overhead_vs_plain']:+.1f} %")
    if report["eval"]:
        lines += ["", "## Evaluation (test split, batch 64)", "", table(report["eval"])]
    if "end_to_end" in report:
        e = report["end_to_end"]
        lines += ["", "## Default experiment on the GPU", "",
                  f"{e['status']}: {e['epochs']} epochs in {e['wall s']:.0f} s; test acc_avg {e['test acc_avg']:.4f}, "
                  f"acc_wg {e['test acc_wg']:.4f}"]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    lines.append(f"\nTotal {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sr-gpu-check"))
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, a few steps each: tests this script")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    report = check(args.bundle.resolve(), dry_run=args.dry_run)
    md = markdown(report)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(md)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    if report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
