"""Shared pieces of the benchmarks: the composed framework config, step clocks, FLOP counts, the
machine's description and a plain markdown table format.

Absolute times on a shared 2-core VM are noise; every benchmark therefore measures its contenders side
by side in one process, interleaved in rounds, and reports ratios next to the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MULTINLI = REPO.parent / "shared" / "data" / "multinli" / "dev_matched.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from subgroup_robustness.utils.env import quiet_third_party  # noqa: E402

quiet_third_party()


# ---- the framework, composed and prepared exactly as a run does it ------------------------------
def _packaged_configs() -> None:
    """The configs ship as ``subgroup_robustness.conf`` once the package is installed; in a bare checkout on
    PYTHONPATH (the GPU machine of gpu_check.sh) that module is the repository's ``conf/`` folder."""
    import importlib.util

    import subgroup_robustness

    if importlib.util.find_spec("subgroup_robustness.conf") is None and (CONF / "__init__.py").exists():
        subgroup_robustness.__path__.append(str(REPO))  # subgroup_robustness.conf -> REPO/conf


def compose(overrides: Sequence[str] = (), out_dir: str | Path | None = None):
    """The resolved run config (``python -m subgroup_robustness <overrides>``) without starting a run:
    ``utils.compose.compose`` on the packaged configs, with a fresh temporary output folder by default."""
    from subgroup_robustness.utils.compose import compose as compose_run

    _packaged_configs()
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="sr-bench-"))
    return compose_run(overrides, out_dir=out_dir, resolve=True, fresh=True)


def framework(cfg):
    """The run's own ``experiment.prepare`` on the pretrained model (never the cached fine-tuned base:
    ``cache_base=false`` and no stages), then the tokenized splits built: a RunContext ready to train."""
    from omegaconf import open_dict

    from subgroup_robustness.experiment import prepare

    with open_dict(cfg):
        cfg.cache_base = False
    ctx = prepare(cfg, stages=[])
    ctx.data.setup()
    return ctx


# ---- clocks --------------------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Timestamps at the end of each step (device-synchronised only at window boundaries, so the GPU
    keeps its queue full) and the (batch, tokens) shape of each step."""

    def __init__(self, warmup: int, windows: int, window: int):
        self.warmup, self.windows, self.window = warmup, windows, window
        self.marks = {warmup + k * window for k in range(windows + 1)}
        self.times: dict[int, float] = {}
        self.stamps: list[float] = []  # every step's end; per-step durations are exact only on CPU
        self.shapes: list[tuple[int, int]] = []

    @property
    def steps(self) -> int:
        return self.warmup + self.windows * self.window

    def tick(self, shape: tuple[int, int]) -> None:
        step = len(self.shapes) + 1
        self.shapes.append((int(shape[0]), int(shape[1])))
        if step in self.marks:
            sync()
            self.times[step] = time.perf_counter()
        self.stamps.append(self.times.get(step) or time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Durations of the timed steps (after warm-up), one per step, in order."""
        return [b - a for a, b in zip(self.stamps[self.warmup - 1:], self.stamps[self.warmup:])]

    def window_stats(self) -> list[dict[str, float]]:
        out = []
        for k in range(self.windows):
            a, b = self.warmup + k * self.window, self.warmup + (k + 1) * self.window
            if a not in self.times or b not in self.times:
                continue
            shapes = self.shapes[a:b]
            secs = self.times[b] - self.times[a]
            out.append({"seconds": secs, "examples": sum(s[0] for s in shapes),
                        "tokens": sum(s[0] * s[1] for s in shapes), "shapes": shapes})
        return out


def lightning_clock(clock: StepClock):
    """The StepClock as a Lightning callback."""
    import lightning.pytorch as L

    class _Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick(tuple(batch["input_ids"].shape))

    return _Clock()


def throughput(stats: Iterable[dict[str, float]]) -> float:
    """Examples per second over the given windows taken together."""
    stats = list(stats)
    secs = sum(s["seconds"] for s in stats)
    return sum(s["examples"] for s in stats) / secs if secs else float("nan")


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median, the run-to-run noise of one contender."""
    xs = [x for x in xs if x == x]
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else float("nan")


# ---- model arithmetic ----------------------------------------------------------------------------
def param_split(model) -> tuple[int, int]:
    """(encoder params, pooler + classifier params): the weights a token or a sequence multiplies."""
    base = getattr(model, "base_model", model)
    encoder = sum(p.numel() for p in base.encoder.parameters())
    embeddings = sum(p.numel() for p in base.embeddings.parameters())
    return encoder, sum(p.numel() for p in model.parameters()) - encoder - embeddings


def train_flops(model, batch: int, tokens: int, *, train: bool = True) -> float:
    """FLOPs of one step on a (batch, tokens) padded batch: 2 (forward) or 6 (forward + backward) per
    weight per token, plus the attention score and value products; embeddings are lookups."""
    cfg = model.config
    enc, head = param_split(model)
    k = 6 if train else 2
    attn = 2 * cfg.num_hidden_layers * batch * tokens * tokens * cfg.hidden_size * (3 if train else 1)
    return k * enc * batch * tokens + k * head * batch + 2 * attn


def matmul_peak(dtype_name: str, seconds: float = 0.2, repeats: int = 5) -> dict[str, float]:
    """Measured GFLOP/s of the matrix products a MiniLM-sized layer runs (max over shapes)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384), (2048, 2048, 2048)]
    if device == "cuda":
        shapes = [(8192, 8192, 8192), (4096, 4096, 4096)]
    best: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        sync()
        t = time.perf_counter()
        reps = 0
        while time.perf_counter() - t < seconds / 4:
            a @ b
            reps += 1
        sync()
        reps = max(1, int(reps * 4 * (seconds / 4) / max(1e-9, time.perf_counter() - t)))
        rates = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            rates.append(2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
        best[f"{m}x{k}x{n}"] = statistics.median(rates)
    best["peak"] = max(best.values())
    return best


# ---- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    from subgroup_robustness.utils.perf import configure_threads, physical_cores
    from subgroup_robustness.utils.resolvers import auto_precision

    configure_threads()

    try:
        flags = set(re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    info = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
        "isa": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags),
        "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "auto_precision": auto_precision("auto"), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def native_bf16() -> bool:
    """Whether bf16 is a fast path here: the framework's ``trainer.precision=auto`` resolves to bf16 (AMX or
    AVX512-BF16 CPUs, bf16-capable GPUs). Elsewhere torch emulates bf16 matrix products: on an AVX2-only AMD
    EPYC (2026-12-08) a 2048x384x1536 product ran at 1.2 GFLOP/s in bf16 against 91 in fp32, so a bf16
    contender there would measure the emulation, not a setting a user would choose."""
    from subgroup_robustness.utils.resolvers import auto_precision

    return auto_precision("auto") in ("bf16-mixed", "bf16-true")


NO_BF16 = ("this CPU has no native bf16 (no AVX512-BF16 or AMX): torch emulates bf16 matrix products at ~1 % of "
           "the fp32 rate, the framework's auto precision is fp32 here, and bf16 rows are not run")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- reporting -----------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def render(result: dict[str, Any]) -> str:
    """A benchmark's section of the README: title, tables, notes."""
    out = [f"### {result['title']}\n"]
    for t in result.get("tables", []):
        if t.get("caption"):
            out.append(t["caption"] + "\n")
        out.append(table(t["rows"], t.get("columns")))
    for note in result.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


def main(name: str, run: Callable[..., dict[str, Any]]) -> None:
    """Command line of one benchmark module: ``python benchmarks/<name>.py [--quick] [--json PATH]``."""
    ap = argparse.ArgumentParser(description=f"benchmark: {name}")
    ap.add_argument("--quick", action="store_true", help="a few steps only: checks that the benchmark runs")
    ap.add_argument("--json", type=Path, help="write the result here (run_all.py collects it)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="benchmark-specific option, e.g. --set weights=/path")
    args = ap.parse_args()
    options = dict(s.split("=", 1) for s in args.set)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    result = run(quick=args.quick, **options)
    result.setdefault("name", name)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    result["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    import torch

    result["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    result.setdefault("notes", []).append(
        f"run {result['date']} in {result['seconds']:.0f} s with {torch.get_num_threads()} torch thread(s); load "
        f"average {result['loadavg'][0]} at start, {result['loadavg'][1]} at end (of {os.cpu_count()} CPUs)")
    print(render(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))


# ---- the plain-PyTorch reference loop ------------------------------------------------------------
def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """The framework's AdamW groups: no decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def plain_train(model, batches: Iterable[dict], clock: StepClock, *, precision: str = "32-true",
                lr: float = 2e-5, weight_decay: float = 0.0, clip: float | None = 1.0,
                fused: bool = True, autocast_cache: bool = True) -> dict[str, float]:
    """A minimal loop doing what the framework's step does (autocast, fused AdamW, linear schedule,
    clipping); returns the seconds spent fetching batches, to size the data loader's share."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused)
    total = clock.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    amp = precision.startswith("bf16")
    data_s = 0.0
    it = iter(batches)
    for _ in range(total):
        t0 = time.perf_counter()
        batch = next(it)
        data_s += time.perf_counter() - t0
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in batch}
        labels = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=autocast_cache):
            loss = F.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(tuple(inputs["input_ids"].shape))
    return {"data_s": data_s}


def cycle(loader_factory: Callable[[], Iterable[dict]]):
    """Batches from a loader, restarted at its end (timed windows may outlast one small epoch)."""
    while True:
        yield from loader_factory()
