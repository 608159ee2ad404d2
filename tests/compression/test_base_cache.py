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
    # dq: int8 Linear weights, a smaller file and fewer float parameters than the base
    model, base = rec["model"], rec["base"]["figures"]
    assert model["weight_dtypes"].get("torch.int8", 0) > 0 and model["eval_device"] == "cpu"
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
