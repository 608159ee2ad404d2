"""The fine-tuned base is trained once per (dataset, model, seed, training settings) and reused by every
post-training compressor; a half-written entry is never used. End to end on the tiny BERT: pr40, dq, sq,
qat and up50 each run and change the size/parameter figures as their method implies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from subgroup_robustness.models import base_cache as bc
from subgroup_robustness.models.base_cache import MARKER, BaseCache, base_key
from tests.helpers import compose, run_in_process, tiny_overrides


def entries(cache_root: Path) -> list[str]:
    bases = cache_root / "bases"
    if not bases.exists():
        return []
    return sorted(p.name for p in bases.iterdir() if p.is_dir() and not p.name.startswith("."))


def phases(rec) -> list[str]:
    return [p["phase"] for p in rec["phases"]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir, redditbias_root):
    """One cache for the module: the first run (dq) trains and stores the base."""
    root = tmp_path_factory.mktemp("shared_base")
    env = SimpleNamespace(root=root, cache=root / "cache", model=tiny_model_dir, data=redditbias_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SR_CACHE_DIR", str(env.cache))
        mp.chdir(root)
        env.first = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, root / "dq", "compressor=dq"))
    return env


def run(shared, monkeypatch, name: str, *extra: str):
    monkeypatch.setenv("SR_CACHE_DIR", str(shared.cache))
    monkeypatch.chdir(shared.root)
    out = shared.root / "_".join([name, *extra]).replace("=", "-")
    return run_in_process(tiny_overrides(shared.model, shared.data, out, f"compressor={name}", *extra))


def test_first_run_trains_and_stores_the_base(shared):
    rec = shared.first
    assert rec["status"] == "completed"
    assert "base_finetune" in phases(rec) and rec["base"]["reused"] is False
    assert entries(shared.cache) == [rec["base"]["key"]]
    assert (Path(rec["base"]["cache_dir"]) / MARKER).exists()
    # dq (torch.ao, the paper's): qint8 Linear weights, a smaller file and fewer float parameters than the base
    model, base = rec["model"], rec["base"]["figures"]
    assert model["weight_dtypes"].get("torch.qint8", 0) > 0 and model["eval_device"] == "cpu"  # the paper's torch.ao dq
    assert model["size_mb"] < base["size_mb"] and model["params"] < base["params"]
    assert rec["compression"]["stages"][0]["cpu_latency_ms_per_example"]["after"] > 0


@pytest.mark.parametrize("name", ["pr40", "sq", "up50"])
def test_post_training_compressors_reuse_the_cached_base(shared, monkeypatch, name):
    rec = run(shared, monkeypatch, name)
    assert rec["status"] == "completed"
    assert "base_finetune" not in phases(rec) and rec["base"]["reused"] is True
    assert rec["base"]["key"] == shared.first["base"]["key"] and entries(shared.cache) == [rec["base"]["key"]]
    assert rec["base"]["metrics"] == shared.first["base"]["metrics"]
    model, base, stage = rec["model"], rec["base"]["figures"], rec["compression"]["stages"][0]
    if name == "pr40":  # 3 of 8 heads go: fewer heads, parameters and bytes; then re-fine-tuned
        assert sum(model["heads_per_layer"]) == 5 and sum(base["heads_per_layer"]) == 8
        assert model["params"] < base["params"] and model["size_mb"] < base["size_mb"]
        assert phases(rec) == ["finetune_head_pruning"] and stage["heads_kept"] == model["heads_per_layer"]
    elif name == "sq":  # no training, int8 weights, evaluated on CPU
        assert phases(rec) == [] and model["eval_device"] == "cpu"
        assert model["weight_dtypes"].get("torch.int8", 0) > 0 and model["size_mb"] < base["size_mb"]
        assert stage["calibration_examples"] > 0
    else:  # up50: the zeros are stored, so size and count stay; half the Linear weights are zero
        assert phases(rec) == ["finetune_magnitude_pruning"]
        assert model["params"] == base["params"] and model["size_mb"] == pytest.approx(base["size_mb"], rel=1e-3)
        assert abs(stage["sparsity"] - 0.5) <= 0.01


def test_qat_starts_from_the_pretrained_model(shared, monkeypatch):
    rec = run(shared, monkeypatch, "qat")
    assert rec["status"] == "completed"
    assert phases(rec) == ["finetune_qat_int8"] and "reused" not in rec["base"]
    assert rec["model"]["weight_dtypes"].get("torch.int8", 0) > 0 and rec["model"]["eval_device"] == "cpu"
    assert rec["model"]["size_mb"] < rec["base"]["figures"]["size_mb"]


def test_a_different_seed_trains_its_own_base(shared, monkeypatch):
    rec = run(shared, monkeypatch, "dq", "seed=2")
    assert "base_finetune" in phases(rec) and rec["base"]["reused"] is False
    assert rec["base"]["key"] != shared.first["base"]["key"]
    assert len(entries(shared.cache)) == 2


def key(*overrides: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.run.dir
        del cfg["hydra"]
    return base_key(cfg)


def test_base_key_depends_on_training_not_on_compressor_or_paths():
    a = key("compressor=pr40", "hydra.run.dir=/tmp/a")
    assert a == key("compressor=dq", "hydra.run.dir=/tmp/b")
    assert a != key("compressor=dq", "seed=2")
    assert a != key("compressor=dq", "dataset.train.lr=3e-5")


def test_a_half_written_entry_is_never_used(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cache = BaseCache(tmp_path / "bases")
    calls = []

    def train():
        calls.append(1)
        return model, tok, {"trained": len(calls)}

    # weights on disk but no marker: what a crash before the marker would leave if written in place
    model.save_pretrained(cache.entry("k"))
    assert not cache.has("k")
    _, _, info, reused = cache.get_or_train("k", train)
    assert (reused, info, calls) == (False, {"trained": 1}, [1]) and cache.has("k")
    _, _, info, reused = cache.get_or_train("k", train)
    assert (reused, info["trained"], calls) == (True, 1, [1])

    # a crash while writing the marker leaves neither an entry nor a temporary folder behind
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(bc, "atomic_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_train("k2", train)
    assert not cache.has("k2") and not cache.entry("k2").exists()
    assert not [p for p in cache.root.iterdir() if p.is_dir() and p.name.startswith(".")]
    monkeypatch.undo()
    _, _, _, reused = cache.get_or_train("k2", train)
    assert reused is False and calls == [1, 1, 1] and cache.has("k2")


# ---- verification, repair and cleaning (issue #17) ------------------------------------------------------
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from subgroup_robustness.utils.errors import CorruptDataError  # noqa: E402
from subgroup_robustness.utils.io import atomic_write_json, read_json  # noqa: E402
from subgroup_robustness.utils.locks import host_name, machine_tag, process_start  # noqa: E402


@pytest.fixture()
def tiny(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
            AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture()
def trainer(tiny):
    """A train() for get_or_train that counts its calls."""
    model, tok = tiny
    calls: list[int] = []

    def train():
        calls.append(1)
        return model, tok, {"trained": len(calls)}

    train.calls = calls
    return train


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == bc.__name__ and r.levelno >= logging.WARNING]


def weights(cache: BaseCache, key: str) -> Path:
    return cache.entry(key) / "model.safetensors"


def test_same_size_corruption_of_the_weights_is_detected_and_rebuilt(tmp_path, trainer, caplog):
    import torch

    cache = BaseCache(tmp_path / "bases")
    model, _, _, reused = cache.get_or_train("k", trainer)
    assert reused is False and trainer.calls == [1]
    w = weights(cache, "k")
    data = bytearray(w.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # in place, same size: in the tensor data, not the header
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="altered"):  # (before: loaded silently)
        cache.load("k")

    caplog.set_level(logging.WARNING)
    back, _, info, reused = cache.get_or_train("k", trainer)
    assert reused is False and trainer.calls == [1, 1] and info == {"trained": 2}
    [line] = cache_warnings(caplog)
    assert str(cache.entry("k")) in line and "altered" in line and "rebuilding" in line and "\n" not in line
    assert cache.notes == [line]
    # the rebuilt entry verifies and serves the right weights
    again, _, info, reused = cache.get_or_train("k", trainer)
    assert reused is True and trainer.calls == [1, 1] and info == {"trained": 2}
    for (name, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_weights_are_one_line_and_a_rebuild(tmp_path, trainer, caplog, capsys):
    cache = BaseCache(tmp_path / "bases")
    cache.get_or_train("k", trainer)
    w = weights(cache, "k")
    size = w.stat().st_size
    with open(w, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CorruptDataError) as err:  # (before: a 35-line SafetensorError)
        cache.load("k")
    assert "truncated" in str(err.value) and "\n" not in str(err.value) and str(cache.entry("k")) in str(err.value)

    caplog.set_level(logging.WARNING)
    _, _, info, reused = cache.get_or_train("k", trainer)
    assert reused is False and info == {"trained": 2}
    [line] = cache_warnings(caplog)
    assert f"truncated ({size // 2:,} of {size:,} bytes)" in line and "rebuilding" in line
    out = capsys.readouterr()
    assert "SafetensorError" not in out.out + out.err + caplog.text
    assert weights(cache, "k").stat().st_size == size and cache.verify("k") == {"trained": 2}
    assert [p.name for p in cache.root.iterdir() if p.is_dir()] == ["k"]  # the bad entry is gone, not kept aside


@pytest.mark.parametrize("marker", ["legacy", "null", "garbage", "extra_file", "missing_file"])
def test_unverifiable_or_broken_entries_are_rebuilt(tmp_path, trainer, caplog, marker):
    cache = BaseCache(tmp_path / "bases")
    cache.get_or_train("k", trainer)
    m = cache.entry("k") / MARKER
    if marker == "legacy":  # written before checksums: the info alone
        atomic_write_json(m, {k: v for k, v in read_json(m).items() if k != "_integrity"})
    elif marker == "null":
        m.write_text("null")
    elif marker == "garbage":
        m.write_bytes(b"\x00\xffnot json")
    elif marker == "extra_file":
        (cache.entry("k") / "pytorch_model.bin").write_bytes(b"x")
    else:
        (cache.entry("k") / "config.json").unlink()
    caplog.set_level(logging.WARNING)
    _, _, info, reused = cache.get_or_train("k", trainer)
    assert reused is False and info == {"trained": 2}
    [line] = cache_warnings(caplog)
    expected = {"legacy": "cannot be verified", "null": "unreadable marker", "garbage": "unreadable marker",
                "extra_file": "pytorch_model.bin", "missing_file": "lacks config.json"}[marker]
    assert expected in line and "rebuilding" in line and "\n" not in line
    assert cache.verify("k") == {"trained": 2}


def test_the_marker_records_every_file_and_files_honour_the_umask(tmp_path, trainer):
    old = os.umask(0o022)
    try:
        cache = BaseCache(tmp_path / "bases")
        cache.get_or_train("k", trainer)
    finally:
        os.umask(old)
    entry = cache.entry("k")
    files = read_json(entry / MARKER)["_integrity"]["files"]
    assert set(files) == {p.name for p in entry.iterdir()} - {MARKER}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert files["model.safetensors"]["size"] == weights(cache, "k").stat().st_size
    assert entry.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700: a shared cache stays readable
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in entry.iterdir())


def scratch(root: Path, key: str, host: str, pid: int, start, machine: str, mb: float = 0.5) -> Path:
    p = root / f".{key}.tmp~{host}~{pid}~{'' if start is None else start}~{machine}~ab12cd34"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"\0" * int(mb * 1e6))
    return p


def dead_pid() -> tuple[int, int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    start = None
    while start is None:
        start = process_start(child.pid)
    child.wait()
    return child.pid, start


def test_stale_temporary_folders_of_dead_writers_are_removed(tmp_path, trainer, caplog):
    root = tmp_path / "bases"
    me, tag = host_name(), machine_tag()
    pid, start = dead_pid()
    dead = scratch(root, "k", me, pid, start, tag)
    live = scratch(root, "k", me, os.getpid(), process_start(os.getpid()), tag)
    recycled = scratch(root, "j", me, os.getpid(), process_start(os.getpid()) + 1, tag)  # a reused PID
    foreign_fresh = scratch(root, "k", "node-elsewhere", 4242, 1, "0badcafe")
    foreign_old = scratch(root, "k", "node-elsewhere", 4243, 1, "0badcafe")
    legacy = root / ".k.x1y2z3_a"  # tempfile.mkdtemp(prefix=".k.") of the code before writer ids
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"\0" * 1000)
    week = time.time() - 7 * 86400
    for folder in (foreign_old, legacy):
        for p in [folder, *folder.iterdir()]:
            os.utime(p, (week, week))
    other = root / ".not-ours"
    other.mkdir()

    caplog.set_level(logging.WARNING)
    cache = BaseCache(root)
    cache.get_or_train("k", trainer)
    assert not dead.exists() and not recycled.exists() and not foreign_old.exists() and not legacy.exists()
    assert live.exists() and foreign_fresh.exists() and other.exists()
    lines = cache_warnings(caplog)
    assert len(lines) == 4 and all("\n" not in x for x in lines)
    assert any(str(dead) in x and f"pid {pid} on {me}, which is dead" in x and "0.5 MB" in x for x in lines)
    assert any(str(foreign_old) in x and "untouched for 168.0 h" in x for x in lines)
    assert cache.clean_stale() == []  # nothing left to do: the live writer's folder stays


def _save_then_die(root: str, model_dir: str) -> None:
    """A child that is SIGKILLed while saving an entry: its weights are written, its marker is not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    bc.atomic_write_json = die
    BaseCache(root).save("k", AutoModelForSequenceClassification.from_pretrained(model_dir),
                         AutoTokenizer.from_pretrained(model_dir), {"trained": 0})


def test_a_kill_during_save_leaves_no_entry_and_its_folder_is_cleaned(tmp_path, trainer, tiny_model_dir, caplog):
    root = tmp_path / "bases"
    child = multiprocessing.get_context("fork").Process(target=_save_then_die, args=(str(root), str(tiny_model_dir)))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    cache = BaseCache(root)
    [left] = [p for p in root.iterdir() if p.is_dir()]
    assert left.name.startswith(".k.tmp~") and f"~{child.pid}~" in left.name
    assert (left / "model.safetensors").exists() and not cache.has("k") and not cache.entry("k").exists()
    caplog.set_level(logging.WARNING)
    _, _, info, reused = cache.get_or_train("k", trainer)
    assert reused is False and info == {"trained": 1} and not left.exists()
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["k"]
    [line] = cache_warnings(caplog)
    assert str(left) in line and "dead" in line
