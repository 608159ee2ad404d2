"""The fast path is also the correct path: bucketed batches keep every example exactly once per epoch
and reshuffle across epochs, padding stays per batch, bf16 is chosen only where the hardware runs it (and
``trainer.precision`` overrides it), the compile flag reaches the training step only, evaluation runs
under inference mode, and thread counts follow the cores a process may use. No timing assertions here:
the timings live in benchmarks/."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from subgroup_robustness.data.datamodule import BucketBatchSampler, Collator, TokenizedSplit
from subgroup_robustness.utils import perf, resolvers
from tests.helpers import compose


def _lengths(n=517, seed=0):
    # long-tailed like real comments: mostly short, a few long
    return np.clip(np.random.default_rng(seed).lognormal(3.0, 0.5, size=n).astype(int), 3, 128)


# ---- bucketing ------------------------------------------------------------------------------------
def test_each_epoch_has_every_example_exactly_once_and_epochs_differ():
    lengths = _lengths()
    s = BucketBatchSampler(lengths, 32, shuffle=True, seed=3)
    epochs = []
    for epoch in range(4):
        s.set_epoch(epoch)  # what Lightning does before each epoch
        batches = list(s)
        assert len(batches) == len(s)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # none lost, none repeated
        epochs.append(flat)
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    # batch order is shuffled too: short and long batches are interleaved, not sorted
    first = [float(np.mean(lengths[b])) for b in BucketBatchSampler(lengths, 32, shuffle=True, seed=3)]
    assert first != sorted(first) and first != sorted(first, reverse=True)


def test_bucketing_is_seeded():
    lengths = _lengths()
    a = BucketBatchSampler(lengths, 32, shuffle=True, seed=7)
    b = BucketBatchSampler(lengths, 32, shuffle=True, seed=7)
    c = BucketBatchSampler(lengths, 32, shuffle=True, seed=8)
    assert [list(a) for _ in range(2)] == [list(b) for _ in range(2)]
    assert list(BucketBatchSampler(lengths, 32, shuffle=True, seed=7)) != list(c)


def _padding_fraction(lengths, batches, fixed=None):
    padded = sum((fixed or int(lengths[b].max())) * len(b) for b in batches)
    return 1 - sum(int(lengths[b].sum()) for b in batches) / padded


def test_bucketing_cuts_padding_against_random_batches_and_fixed_length():
    lengths = _lengths()
    bucketed = list(BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket=True))
    random = list(BucketBatchSampler(lengths, 32, shuffle=True, seed=0, bucket=False))
    fixed = _padding_fraction(lengths, random, fixed=128)
    dyn, buck = _padding_fraction(lengths, random), _padding_fraction(lengths, bucketed)
    assert buck < 0.1 < dyn < fixed, (buck, dyn, fixed)


def test_ddp_training_shards_have_equal_steps_and_cover_everything():
    lengths = _lengths(203)
    shards = [BucketBatchSampler(lengths, 16, shuffle=True, seed=0, num_replicas=3, rank=r) for r in range(3)]
    batches = [list(s) for s in shards]
    assert len({len(b) for b in batches}) == 1 and all(len(b) == len(s) for b, s in zip(batches, shards))
    assert set(i for bs in batches for b in bs for i in b) == set(range(203))


def test_collator_pads_to_the_batch_longest_with_an_exact_mask():
    lengths = [5, 9, 2]
    ids = torch.arange(1, sum(lengths) + 1, dtype=torch.int32)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
    split = TokenizedSplit(ids, offsets, None, torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.tensor([10, 11, 12]))
    batch = Collator(pad_id=0)([split[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 9)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["input_ids"][2, :2].tolist() == [15, 16]  # tokens kept in order, none truncated
    assert batch["labels"].tolist() == [0, 1, 1] and batch["index"].tolist() == [10, 11, 12]


class _Record(L.Callback):
    def __init__(self):
        self.epochs: dict[int, list[int]] = {}
        self.eval_inference: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_inference.append((trainer.state.fn.value, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    on_test_batch_start = on_validation_batch_start


def test_lightning_fit_sees_each_example_once_per_epoch_in_new_orders(tiny_model_dir, redditbias_root, sr_env):
    from subgroup_robustness.models.loading import load_model

    cfg = compose(["model=local", f"model.path={tiny_model_dir}", f"dataset.source.root={redditbias_root}",
                   "trainer.max_epochs=2", "trainer.precision=32-true", f"paths.output_dir={sr_env}",
                   "data.batch_size=16"])
    dm = instantiate(cfg.data, _recursive_=False)
    model, tok = load_model(cfg.model, 2)
    dm.set_tokenizer(tok)
    dm.setup()
    module = instantiate(cfg.module)(model=model)
    rec = _Record()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[rec], enable_progress_bar=False,
                          default_root_dir=str(sr_env))
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    train_index = sorted(dm.splits["train"].index.tolist())
    assert sorted(rec.epochs[0]) == train_index and sorted(rec.epochs[1]) == train_index
    assert rec.epochs[0] != rec.epochs[1]
    stages = {fn for fn, _, _ in rec.eval_inference}
    assert stages == {"fit", "validate", "test"}
    assert not any(grad for _, _, grad in rec.eval_inference)  # no autograd graph during any evaluation
    # the evaluation that produces the results runs under inference_mode; Lightning's in-fit validation
    # uses no_grad by design (inference tensors must not leak into the training that follows)
    assert all(inf for fn, inf, _ in rec.eval_inference if fn in ("validate", "test"))


# ---- precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu_bf16,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_follows_the_cpu(monkeypatch, cpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(resolvers, "cpu_supports_bf16", lambda: cpu_bf16)
    assert resolvers.auto_precision("auto") == expected
    assert resolvers.auto_precision("16-mixed") == "16-mixed"  # an explicit value is never replaced


@pytest.mark.parametrize("bf16_gpu,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_trainer_config_picks_bf16_on_gpus_that_run_it(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    for trainer in ("gpu", "ddp"):
        cfg = compose([f"trainer={trainer}"])
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", expected)
    assert compose(["trainer=gpu", "trainer.precision=32-true"]).trainer.precision == "32-true"


def test_cpu_bf16_detection_reads_the_real_flags():
    info = Path("/proc/cpuinfo")
    flags = info.read_text(encoding="utf-8") if info.exists() else ""
    assert resolvers.cpu_supports_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_trainer_precision_resolves_to_auto_and_can_be_overridden(tmp_path):
    auto = resolvers.auto_precision("auto")
    assert compose([]).trainer.precision == auto
    assert compose(["trainer.precision=32-true"]).trainer.precision == "32-true"
    trainer = instantiate(compose(["trainer.precision=32-true"]).trainer, logger=False,
                          default_root_dir=str(tmp_path))
    assert str(trainer.precision) == "32-true"
    trainer = instantiate(compose(["trainer.precision=bf16-mixed"]).trainer, logger=False,
                          default_root_dir=str(tmp_path))
    assert str(trainer.precision) == "bf16-mixed"


def test_fast_path_is_the_default():
    cfg = compose([])
    assert cfg.data.bucket is True and cfg.data.num_workers == 0
    assert cfg.module.fused_adamw is True and cfg.module.compile is False
    assert cfg.trainer.get("inference_mode", True) is not False


@pytest.mark.parametrize("precision,fused", [("bf16-mixed", True), ("32-true", True), ("16-mixed", False)])
def test_fused_adamw_except_under_fp16_scaling(precision, fused):
    from transformers import BertConfig, BertForSequenceClassification

    from subgroup_robustness.models.classifier import SequenceClassifier

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    module = SequenceClassifier(model, scheduler="constant")
    module._trainer = type("T", (), {"precision": precision})()
    opt = module.configure_optimizers()
    assert bool(opt.defaults.get("fused")) is fused


# ---- autocast weight-cast cache -------------------------------------------------------------------
def test_bf16_runs_train_steps_with_the_cast_cache_and_evaluation_without(tiny_model_dir, redditbias_root, sr_env):
    """Lightning's own bf16 plugin turns autocast's cache off (~13 % slower steps on CPU); the framework's
    trainer uses its own plugin: cache on in training steps, off whenever grad is off, gradients unchanged."""
    import copy

    from lightning.pytorch.plugins.precision import MixedPrecision

    from subgroup_robustness.experiment import RunContext
    from subgroup_robustness.models.loading import load_model
    from subgroup_robustness.models.precision import CachedBF16Autocast, precision_plugin

    assert precision_plugin("32-true", "cpu") is None and precision_plugin("16-mixed", "cpu") is None
    assert precision_plugin("bf16-mixed", "cpu").device == "cpu"
    assert precision_plugin("bf16-mixed", "gpu").device == "cuda"

    cfg = compose(["model=local", f"model.path={tiny_model_dir}", f"dataset.source.root={redditbias_root}",
                   "trainer.precision=bf16-mixed", f"paths.output_dir={sr_env}", "callbacks=none",
                   "logger=none", "+trainer.max_steps=2", "+trainer.limit_val_batches=2"])
    dm = instantiate(cfg.data, _recursive_=False)
    model, tok = load_model(cfg.model, 2)
    dm.set_tokenizer(tok)
    dm.setup()
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=sr_env)
    trainer = ctx.trainer(training=True, enable_progress_bar=False)
    assert isinstance(trainer.precision_plugin, CachedBF16Autocast) and str(trainer.precision) == "bf16-mixed"
    assert str(ctx.trainer(training=False, on_cpu=True).precision) == "32-true"  # explicit fp32 stays Lightning's

    seen = []
    hook = model.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                                torch.is_autocast_cache_enabled())))
    module = instantiate(cfg.module)(model=model)
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    hook.remove()
    assert (True, True, True) in seen  # training steps: autocast with the cache
    assert (False, True, False) in seen  # evaluation: autocast, no cache
    assert all(cache == grad for grad, _, cache in seen)

    # one step, same weights and batch: the gradients equal those under Lightning's uncached autocast
    batch = next(iter(dm.train_dataloader()))

    def grads(plugin):
        m = copy.deepcopy(model).train()
        module = instantiate(cfg.module)(model=m)
        torch.manual_seed(0)
        with plugin.forward_context():
            loss = module.training_step(batch, 0)
        loss.backward()
        return [p.grad.clone() for p in m.parameters() if p.requires_grad]

    cached, plain = grads(CachedBF16Autocast("cpu")), grads(MixedPrecision("bf16-mixed", "cpu"))
    assert len(cached) == len(plain) and all(g is not None for g in cached)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- logging without per-step host syncs ----------------------------------------------------------
def test_train_loss_reaches_the_logger_and_the_cpu_progress_bar(tiny_model_dir, redditbias_root, sr_env,
                                                                 monkeypatch):
    from lightning.pytorch.loggers import Logger

    from subgroup_robustness.models.loading import load_model

    cfg = compose(["model=local", f"model.path={tiny_model_dir}", f"dataset.source.root={redditbias_root}",
                   "trainer.precision=32-true", f"paths.output_dir={sr_env}", "+trainer.max_steps=3",
                   "trainer.log_every_n_steps=1"])
    dm = instantiate(cfg.data, _recursive_=False)
    model, tok = load_model(cfg.model, 2)
    dm.set_tokenizer(tok)
    module = instantiate(cfg.module)(model=model)
    logged = []

    class Spy(Logger):
        name, version = "spy", 0

        @property
        def experiment(self):
            return None

        def log_hyperparams(self, *a, **k):
            pass

        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

    trainer = instantiate(cfg.trainer, logger=Spy(), enable_progress_bar=False, default_root_dir=str(sr_env),
                          limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert sum("train/loss" in m for m in logged) == 3
    # on CPU the bar may show it (reading a CPU tensor costs nothing); on a GPU it is left out
    assert "train/loss" in trainer.progress_bar_metrics

    # logging every 2nd step: the loss is logged exactly on the steps the logger records
    logged.clear()
    calls = []
    module = instantiate(cfg.module)(model=model)
    real_log = module.log
    monkeypatch.setattr(module, "log", lambda *a, **k: (calls.append(module.global_step), real_log(*a, **k)))
    trainer = instantiate(cfg.trainer, logger=Spy(), enable_progress_bar=False, default_root_dir=str(sr_env),
                          limit_val_batches=0, log_every_n_steps=2, max_steps=5)
    trainer.fit(module, datamodule=dm)
    assert calls == [1, 3]  # steps 2 and 4 (0-based global_step at their start), not every step
    assert [m["train/loss"] for m in logged if "train/loss" in m] and sum("train/loss" in m for m in logged) == 2


# ---- torch.compile flag ---------------------------------------------------------------------------
def test_compile_flag_compiles_the_training_forward_only(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    calls = {"compile": [], "compiled_forward": 0}

    def fake_compile(model, **kwargs):
        calls["compile"].append(kwargs)

        def run(**inputs):
            calls["compiled_forward"] += 1
            return model(**inputs)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = compose(["module.compile=true"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    module = instantiate(cfg.module)(model=model)
    keys = set(module.state_dict())
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([1]), "metadata": torch.tensor([[1, 0]])}
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    module.train()
    loss = module.training_step(batch, 0)
    loss.backward()
    module.training_step(batch, 1)
    assert calls["compile"] == [{"dynamic": True}] and calls["compiled_forward"] == 2  # compiled once, reused
    module.eval()
    with torch.inference_mode():
        module.validation_step(batch, 0)
    assert calls["compiled_forward"] == 2  # evaluation stays eager
    assert set(module.state_dict()) == keys  # checkpoints and BestWeights see the plain model's keys
    module.model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    module.train()
    module.training_step(batch, 2)
    assert len(calls["compile"]) == 2  # a replaced model (e.g. after pruning) is compiled afresh


def test_compile_flag_is_off_by_default(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    module = instantiate(compose([]).module)(model=AutoModelForSequenceClassification.from_pretrained(tiny_model_dir))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = {"input_ids": torch.tensor([[2, 7, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([0]), "metadata": torch.tensor([[0, 0]])}
    module.training_step(batch, 0)


@pytest.mark.slow
def test_real_dynamo_capture_trains_like_eager(tiny_model_dir, monkeypatch):
    """The HF model really goes through torch.compile (dynamo + AOTAutograd; the aot_eager backend skips
    inductor's C++ code generation, which takes minutes here) with dynamic sequence lengths, and the
    compiled steps give eager's losses and gradients."""
    from transformers import AutoModelForSequenceClassification

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        module = instantiate(compose([f"module.compile={str(flag).lower()}"]).module)(model=model)
        monkeypatch.setattr(module, "log", lambda *a, **k: None)
        module.train()
        losses = []
        for t in (5, 9, 7):  # three sequence lengths: one dynamic graph, no recompile per length
            torch.manual_seed(t)
            batch = {"input_ids": torch.randint(5, 60, (4, t)), "attention_mask": torch.ones(4, t, dtype=torch.long),
                     "labels": torch.tensor([0, 1, 1, 0]), "metadata": torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]])}
            loss = module.training_step(batch, 0)
            loss.backward()
            losses.append(float(loss))
        results[flag] = (losses, model.classifier.weight.grad.clone())
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    assert torch.allclose(results[True][1], results[False][1], atol=1e-5)


# ---- threads --------------------------------------------------------------------------------------
def _fake_sysfs(root, topology):
    for cpu, (pkg, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_cores_not_hyperthreads_and_respects_the_quota(tmp_path):
    sysfs = _fake_sysfs(tmp_path / "cpu", {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    no_cgroup = tmp_path / "none"
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, no_cgroup) == 3
    assert perf.physical_cores([0, 1], sysfs, no_cgroup) == 1  # pinned to one core's two threads
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container quota
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, cg) == 2
    (cg / "cpu.max").write_text("max 100000\n")
    assert perf.physical_cores([0, 1, 2, 3, 4, 5], sysfs, cg) == 3


def test_configure_threads_obeys_overrides(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SR_NUM_THREADS", "1")
        assert perf.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("SR_NUM_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        assert perf.configure_threads() == 1  # OMP_NUM_THREADS: the user's choice, left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(perf, "physical_cores", lambda: 2)
        assert perf.configure_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- allocator ------------------------------------------------------------------------------------
def test_keep_freed_memory_applies_and_reverts(monkeypatch):
    """The contract only: glibc accepts both parameter sets (mallopt returns 0 for an unknown parameter or
    value) and the environment switches it off. Whether the kernel then stops re-faulting freed blocks
    depends on the sandbox (it did here, not on the CI machine), so the effect is measured in
    benchmarks/bench_train.py, not asserted."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        assert perf.keep_freed_memory(True) is False
        return
    try:
        assert perf.keep_freed_memory(True) is True
        assert perf.keep_freed_memory(False) is True  # glibc's defaults restored
        monkeypatch.setenv("SR_KEEP_FREED_MEMORY", "0")
        assert perf.keep_freed_memory(True) is False  # the opt-out
    finally:
        perf.keep_freed_memory(False)
