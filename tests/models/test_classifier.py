"""The training step of ``SequenceClassifier`` on the fast path: fused AdamW except under fp16 loss
scaling, the train loss logged only on the steps the logger records, and the ``module.compile`` flag
compiling the training forward only (off by default)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers import compose


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


@pytest.mark.parametrize("failure", ["dynamo", "other"])
def test_a_failing_compile_falls_back_to_eager_with_one_line(tiny_model_dir, monkeypatch, failure):
    """A model torch.compile cannot handle trains eagerly (one line says why); any other error surfaces."""
    from torch._dynamo.exc import Unsupported
    from transformers import AutoModelForSequenceClassification

    from subgroup_robustness.utils.console import console

    def fake_compile(model, **kwargs):
        def broken(**inputs):
            if failure == "dynamo":
                raise Unsupported("graph break in a custom op\nmore detail")
            raise ValueError("a bad batch")
        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    module = instantiate(compose(["module.compile=true"]).module)(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_model_dir))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = {"input_ids": torch.tensor([[2, 7, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([0]), "metadata": torch.tensor([[0, 0]])}
    if failure == "other":
        with pytest.raises(ValueError, match="a bad batch"):
            module.training_step(batch, 0)
        return
    with console.capture() as cap:
        loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and not module.compile_model
    line = cap.get().strip()
    assert line.count("\n") == 0 and "torch.compile failed (Unsupported: graph break in a custom op)" in line
    assert "training eagerly" in line
    module.training_step(batch, 1)  # eager from now on: the broken compiled forward is not called again


def test_compile_caches_live_under_the_project_cache(tmp_path, monkeypatch):
    import os

    from subgroup_robustness.utils.perf import configure_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_FX_GRAPH_CACHE", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_AUTOGRAD_CACHE", raising=False)
    assert configure_compile_cache(tmp_path) == str(tmp_path / "compile") and (tmp_path / "compile").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "compile")  # what inductor reads
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's setting wins
    assert configure_compile_cache(tmp_path / "other") == str(tmp_path / "mine")


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
