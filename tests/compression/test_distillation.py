"""Task distillation: the student's layers are the teacher's, the loss is what the config says, the
teacher stays frozen and out of the optimizer and state dict, and 3- and 2-layer students run end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from subgroup_robustness.compression.context import Compressed, SimpleContext
from subgroup_robustness.compression.distillation import (
    DistillationLoss, TaskDistillation, select_layers, soft_target_loss, student_from_teacher, uniform_layer_map)
from subgroup_robustness.models.classifier import SequenceClassifier
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import compose, make_tiny_bert, run_in_process, tiny_overrides


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 6-layer tiny BERT, the depth of the offline MiniLM teacher."""
    return make_tiny_bert(tmp_path_factory.mktemp("teacher6"), layers=6)


def load(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def fake_ctx(folder, **extra):
    """The context a run gives the first stage: the cached fine-tuned base (here a tiny BERT) and its record."""
    model, tok = load(folder)
    return SimpleContext(model=model, tokenizer=tok, label_names=["not_biased", "biased"],
                         base={"key": "k", "metrics": {"test": {"test/acc_avg": 0.5}}}, **extra)


def batch_of(tok, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (n, 12), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    mask = torch.ones_like(ids)
    mask[: n // 2, 9:] = 0  # some padding
    labels = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "metadata": labels[:, None]}


def test_layer_selection():
    assert select_layers(6, 3) == [0, 2, 4]  # every other layer, DistilBERT-style
    assert select_layers(6, 2) == [0, 3]
    assert select_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert select_layers(6, 2, selection="bottom") == [0, 1] and select_layers(6, 2, selection="top") == [4, 5]
    assert select_layers(6, keep=[1, 5]) == [1, 5]
    assert uniform_layer_map(3, 6) == [1, 3, 5] and uniform_layer_map(4, 12) == [2, 5, 8, 11]
    for kwargs in ({"num_layers": 6}, {"num_layers": 0}, {"keep": [2, 1]}, {"keep": [0, 6]},
                   {"keep": list(range(6))}, {"num_layers": 2, "selection": "middle"}):
        with pytest.raises(ConfigError):
            select_layers(6, **kwargs)


def test_student_starts_as_the_teachers_layers(teacher_dir):
    teacher, _ = load(teacher_dir)
    student = student_from_teacher(teacher, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert teacher.config.num_hidden_layers == 6 and len(teacher.bert.encoder.layer) == 6
    for j, i in enumerate([0, 2, 4]):
        s, t = student.bert.encoder.layer[j].state_dict(), teacher.bert.encoder.layer[i].state_dict()
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
        assert student.bert.encoder.layer[j].attention.self.layer_idx == j
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        s, t = student.get_submodule(part).state_dict(), teacher.get_submodule(part).state_dict()
        assert all(torch.equal(s[k], t[k]) for k in s)
    with torch.no_grad():  # a copy, not a view: training the student leaves the teacher alone
        student.bert.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[0].output.dense.weight)
    ids = torch.tensor([[2, 7, 8, 3]])
    assert student(input_ids=ids).logits.shape == (1, 2)


def test_student_from_a_distilbert_teacher():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    teacher = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=4, n_heads=4,
                                                                   hidden_dim=64, max_position_embeddings=64))
    student = student_from_teacher(teacher, select_layers(4, 2))
    assert student.config.n_layers == 2 and len(student.distilbert.transformer.layer) == 2
    assert torch.equal(student.distilbert.transformer.layer[1].ffn.lin1.weight,
                       teacher.distilbert.transformer.layer[2].ffn.lin1.weight)
    assert student(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


def test_soft_target_loss_is_kl_times_t_squared():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    for temp in (1.0, 2.0, 5.0):
        p_t, log_p_s = F.softmax(t / temp, -1), F.log_softmax(s / temp, -1)
        expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * temp ** 2
        torch.testing.assert_close(soft_target_loss(s, t, temp), expected)
    assert soft_target_loss(t, t, 2.0).abs() < 1e-6


def test_temperature_and_weights_reach_the_training_loss(teacher_dir):
    """The loss of a training step is ce_weight x CE + soft_weight x KD(T), with the config's values."""
    ctx = fake_ctx(teacher_dir)
    stage = instantiate(compose(["compressor=distill", "compressor.stages.0.temperature=4",
                                 "compressor.stages.0.soft_weight=0.3", "compressor.stages.0.ce_weight=0.7"]
                                ).compressor.stages[0])
    assert (stage.temperature, stage.soft_weight, stage.ce_weight, stage.num_layers) == (4.0, 0.3, 0.7, 3)
    teacher = ctx.model
    ctx.update(stage.apply(ctx))
    assert ctx.teacher is teacher and ctx.model is not teacher
    module = SequenceClassifier(ctx.model, scheduler="constant")
    stage.configure_module(ctx, module)
    assert module.ce_weight == 0.7 and module.distillation.temperature == 4.0
    batch = batch_of(ctx.tokenizer)
    module.eval()  # no dropout: the two computations see the same logits
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        s_logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = 0.7 * F.cross_entropy(s_logits, batch["labels"]) + 0.3 * soft_target_loss(s_logits, t_logits, 4.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert module.distillation.last["kd_soft"] == pytest.approx(float(soft_target_loss(s_logits, t_logits, 4.0)),
                                                                rel=1e-5)


def test_teacher_is_frozen_and_outside_optimizer_and_state_dict(teacher_dir):
    ctx = fake_ctx(teacher_dir)
    stage = TaskDistillation(num_layers=2, hidden_weight=1.0)
    base = ctx.model
    result = stage.apply(ctx)
    assert isinstance(result, Compressed) and result.teacher is base and result.tokenizer is None
    assert ctx.model is base and ctx.teacher is None  # the stage hands its result back; the run assigns it
    ctx.update(result)
    teacher, student = ctx.teacher, ctx.model
    module = SequenceClassifier(student, scheduler="constant")
    stage.configure_module(ctx, module)
    module.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith(("model.", "distillation.")) for k in module.state_dict())
    optimised = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in student.parameters()} <= optimised
    module.training_step(batch_of(ctx.tokenizer), 0)
    assert not teacher.training and next(teacher.parameters()).grad is None
    # the run drops its teacher after this fine-tuning (test_chain checks the experiment does); the stage
    # lets go of it: no new model, no hook, no module attribute that would keep it alive
    assert stage.finalize(ctx) is None
    assert module.loss_hooks == [] and module.ce_weight == 1.0
    assert not hasattr(module, "distillation") and not module.output_hidden_states
    assert stage._hook is None and stage._module is None
    rep = stage.report(ctx)
    assert rep["student"] == {"init": "teacher_layers", "layers_kept": [0, 3], "layer_selection": "alternate",
                              "layers": 2, "hidden_size": 32}
    assert rep["teacher"]["figures"]["layers"] == 6 and rep["teacher"]["key"] == "k"


def train_steps(module, batch, steps=25, lr=3e-3):
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_kd_loss_falls_on_a_toy_task(teacher_dir):
    torch.manual_seed(0)
    ctx = fake_ctx(teacher_dir)
    with torch.no_grad():  # a confident teacher, and a student head that starts far from it
        ctx.model.classifier.weight.mul_(30.0)
    stage = TaskDistillation(num_layers=2, soft_weight=1.0, ce_weight=0.0, temperature=2.0)
    ctx.update(stage.apply(ctx))
    torch.nn.init.normal_(ctx.model.classifier.weight, std=1.0)
    module = SequenceClassifier(ctx.model, scheduler="constant")
    stage.configure_module(ctx, module)
    module.eval()  # a deterministic objective for the check
    losses = train_steps(module, batch_of(ctx.tokenizer))
    assert losses[0] > 0 and losses[-1] < 0.3 * losses[0], losses


def test_hidden_and_attention_losses_with_a_narrower_student(tmp_path, teacher_dir):
    """A student of another width and depth (a model config sharing the tokenizer) learns the teacher's
    hidden states through a projection and its attention maps (eager attention switched on and back)."""
    small = make_tiny_bert(tmp_path / "small", layers=2, hidden=16, heads=2)
    ctx = fake_ctx(teacher_dir)
    ctx.tokenizer.save_pretrained(small)  # the same tokenizer, as prajjwal1/bert-* share bert-base-uncased's
    assert ctx.model.config._attn_implementation == "sdpa"
    stage = TaskDistillation(student_model={"name": "small", "source": "local", "path": str(small)},
                             soft_weight=0.0, ce_weight=0.0, hidden_weight=1.0, attention_weight=1.0)
    ctx.update(stage.apply(ctx))
    assert ctx.model.config.hidden_size == 16 and ctx.model.config._attn_implementation == "eager"
    module = SequenceClassifier(ctx.model, scheduler="constant")
    stage.configure_module(ctx, module)
    hook = module.distillation
    assert hook.layer_map == [2, 5] and len(hook.projections) == 3
    assert hook.projections[0].in_features == 16 and hook.projections[0].out_features == 32
    module.eval()
    losses = train_steps(module, batch_of(ctx.tokenizer), steps=20)
    assert set(hook.last) == {"kd_hidden", "kd_attention"} and all(math.isfinite(v) for v in hook.last.values())
    assert losses[-1] < 0.7 * losses[0], losses
    assert hook.projections[0].weight.grad is not None
    ctx.update(stage.finalize(ctx))
    assert ctx.model.config._attn_implementation == "sdpa"
    assert stage.report(ctx)["student"]["init"] == "model"


def test_distillation_loss_hook_weights_each_term(teacher_dir):
    teacher, tok = load(teacher_dir)
    teacher.eval()
    batch = batch_of(tok)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    outputs = SimpleNamespace(logits=t_logits + torch.randn_like(t_logits))
    one = DistillationLoss(teacher, temperature=3.0, soft_weight=1.0)(None, batch, outputs)
    two = DistillationLoss(teacher, temperature=3.0, soft_weight=2.5)(None, batch, outputs)
    torch.testing.assert_close(two, 2.5 * one)
    torch.testing.assert_close(one, soft_target_loss(outputs.logits, t_logits, 3.0))


def test_misconfigurations_fail_clearly(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="temperature"):
        TaskDistillation(temperature=0)
    with pytest.raises(ConfigError, match="nothing would train"):
        TaskDistillation(soft_weight=0, ce_weight=0)
    ctx = fake_ctx(teacher_dir)
    ctx.base = None  # the model is not the fine-tuned base (e.g. after another stage)
    with pytest.raises(ConfigError, match="first"):
        TaskDistillation().apply(ctx)
    other = make_tiny_bert(tmp_path / "other", corpus=["completely different words here"] * 50)
    with pytest.raises(ConfigError, match="vocabulary"):
        TaskDistillation(student_model={"name": "other", "source": "local", "path": str(other)}).apply(
            fake_ctx(teacher_dir))
    with pytest.raises(ConfigError, match="conf/model/nope.yaml"):
        TaskDistillation(student_model="nope").apply(fake_ctx(teacher_dir))
    with pytest.raises(ConfigError, match="num_layers"):
        TaskDistillation(num_layers=6).apply(fake_ctx(teacher_dir))


@pytest.mark.parametrize("compressor,layers,kept", [("distill", 3, [0, 2, 4]), ("distill_l2", 2, [0, 3])])
def test_distill_end_to_end(compressor, layers, kept, teacher_dir, redditbias_root, sr_env):
    extra = ["compressor.stages.0.hidden_weight=1", "compressor.stages.0.attention_weight=1"] if layers == 2 else []
    rec = run_in_process(tiny_overrides(teacher_dir, redditbias_root, sr_env / compressor,
                                        f"compressor={compressor}", *extra))
    assert rec["status"] == "completed"
    stage = rec["compression"]["stages"][0]
    assert stage["name"] == "distill" and stage["student"]["layers_kept"] == kept
    assert rec["model"]["layers"] == layers and rec["base"]["figures"]["layers"] == 6
    assert stage["teacher"]["figures"]["layers"] == 6 and stage["teacher"]["key"] == rec["base"]["key"]
    assert rec["model"]["params"] < rec["base"]["figures"]["params"]
    assert rec["model"]["size_mb"] < rec["base"]["figures"]["size_mb"]
    assert [p["phase"] for p in rec["phases"]][-1] == "finetune_distill"
    latency = stage["cpu_latency_ms_per_example"]  # measured by the run around every stage
    assert latency["before"] > 0 and latency["after"] > 0
    assert 0.0 <= rec["metrics"]["test"]["test/acc_wg"] <= rec["metrics"]["test"]["test/acc_avg"] <= 1.0
