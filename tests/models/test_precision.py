"""Precision: bf16 is chosen only where the hardware runs it (``trainer.precision`` overrides it), and the
framework's bf16 plugin keeps autocast's weight-cast cache in training steps (Lightning's turns it off)
without changing the gradients; evaluation runs without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from subgroup_robustness.utils import resolvers
from tests.helpers import compose


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
    ctx = RunContext(cfg=cfg, data=dm, workdir=sr_env)
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
