"""docs/extending.md, followed to the letter: a new dataset source and a new compressor, added from this test
folder through Hydra's search path (no file of the package touched), run end to end through the real CLI.
If the walk-through rots, this fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import REPO, run_cli

HERE = Path(__file__).parent


def test_the_walkthrough_names_the_files_this_test_uses():
    doc = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    for path in ("tests/extending/toyds.py", "tests/extending/conf/dataset/toyds.yaml",
                 "tests/extending/toy_compressor.py", "tests/extending/conf/compressor/_random_pruning.yaml",
                 "tests/extending/conf/compressor/rp50.yaml"):
        assert path in doc, path
        assert (REPO / path).exists(), path
    # the doc's code blocks are the files themselves (no drift between the page and the test)
    for name in ("toyds.py", "toy_compressor.py"):
        body = (HERE / name).read_text(encoding="utf-8")
        first_def = re.search(r"^(class|def) \w+.*$", body, re.M).group(0)
        assert first_def in doc, (name, first_def)


def test_toy_source_and_toy_compressor_run_end_to_end(tmp_path, tiny_model_dir):
    args = [f"hydra.searchpath=[file://{HERE / 'conf'}]", "dataset=toyds", "compressor=rp50",
            "model=local", f"model.path={tiny_model_dir}", "trainer.precision=32-true", "logger=none",
            "callbacks.progress=null", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(args, cwd=REPO, env={"SR_CACHE_DIR": str(tmp_path / "cache"), "SR_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "completed" and rec["run"]["dataset"] == "toyds"
    assert set(rec["groups"]["test"]["groups"]["acc"]) == {"negative:standard", "negative:regional",
                                                          "positive:standard", "positive:regional"}
    (stage,) = rec["compression"]["stages"]
    assert stage["name"] == "random_pruning" and stage["weights_zeroed"] > 0
    assert stage["cpu_latency_ms_per_example"]["after"] > 0  # measured by the experiment, not the plug-in
    bad = run_cli([*args[:3], "compressor.sparsity=2", *args[3:]], cwd=REPO,
                  env={"SR_CACHE_DIR": str(tmp_path / "cache")})
    assert bad.returncode == 2 and "sparsity=2" in (bad.stderr + bad.stdout)
