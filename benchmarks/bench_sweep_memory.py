"""Peak memory over a sweep in one process (issue 17): N identical jobs (each in its own folder, so none is
skipped) run back to back in one interpreter, as Hydra's basic launcher runs a multirun; the process's
resident memory is read after each job. Before ``perf.release_memory`` (gc + malloc_trim at the end of
every job) six pr40 jobs grew 2.05 -> 2.73 -> 3.15 -> 3.57 GB. The target: every job's RSS within 1.2x of
the first job's.

    python benchmarks/bench_sweep_memory.py --jobs 6 --compressor pr40 --train-batches 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--compressor", default="pr40")
    ap.add_argument("--train-batches", type=int, default=40, help="trainer.limit_train_batches (keeps it short)")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args(argv)

    from subgroup_robustness.experiment import run
    from subgroup_robustness.preflight import check_config
    from subgroup_robustness.utils.compose import compose

    root = Path(tempfile.mkdtemp(prefix="sr-sweep-mem-"))
    os.environ["SR_CACHE_DIR"] = str(root / "cache")
    rows = []
    for job in range(args.jobs):
        t0 = time.perf_counter()
        cfg = compose([f"compressor={args.compressor}", f"+trainer.limit_train_batches={args.train_batches}",
                       "trainer.max_epochs=1", "logger=none", "print_config=false", "callbacks.progress=null"],
                      out_dir=root / f"job{job}", fresh=True)
        check_config(cfg)
        rec = run(cfg)
        rows.append({"job": job, "status": rec["status"], "rss_mb": round(rss_mb(), 1),
                     "peak_mb": round(peak_mb(), 1), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]["rss_mb"]
    result = {"jobs": rows, "max_over_first": round(max(r["rss_mb"] for r in rows) / first, 3),
              "compressor": args.compressor, "train_batches": args.train_batches}
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
