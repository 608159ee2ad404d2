"""Compressor chains: order validation, expansion of compressor.chain, the fine-tuning schedule that
``experiment.execute`` follows, and the per-stage report.

The chain logic is tested with the small compressors below (their flags are all that validation reads),
so these tests do not depend on the real pruning/quantization/distillation code; the last test runs the
real [pr40, dq] chain on the tiny model."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.chain import expand_chain, fit_schedule, validate_chain
from subgroup_robustness.compression.context import Compressed
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import CONF, REPO, compose, run_cli, run_in_process, tiny_overrides


# ---- test-local compressors ----------------------------------------------------------------------------
class Vocab(Compressor):
    """Returns a new tokenizer, as VocabularyTransfer does: the run must re-tokenise its data."""

    name, stage, start_from, trains = "vocab", "before", "pretrained", True

    def apply(self, ctx):
        return Compressed(ctx.model, tokenizer=types.SimpleNamespace(made_by="vocab"))


class Distill(Compressor):
    """Returns a teacher, as TaskDistillation does: the run holds it for the next fine-tuning only."""

    name, stage, start_from, trains = "distill", "during", "finetuned", True

    def apply(self, ctx):
        return Compressed(ctx.model, teacher=types.SimpleNamespace(teacher_of="distill"))


class QAT(Compressor):
    name, stage, start_from, trains, quantizes = "qat", "during", "pretrained", True, True  # as QuantizationAwareTraining


class Prune(Compressor):
    """Drops half of every FFN's neurons and re-fine-tunes: fewer parameters, measurably."""

    name, stage, start_from, trains = "prune", "after", "finetuned", True

    def __init__(self, fraction: float = 0.5, seed: int = 0):
        self.fraction, self.seed = fraction, seed

    def apply(self, ctx):
        from transformers.pytorch_utils import prune_linear_layer

        for layer in ctx.model.bert.encoder.layer:
            n = layer.intermediate.dense.out_features
            keep = torch.arange(n - int(n * self.fraction))
            layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep, dim=0)
            layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)
        return Compressed(ctx.model)

    def report(self, ctx):
        return {"ffn": ctx.model.bert.encoder.layer[0].intermediate.dense.out_features}


class Shrink(Compressor):
    """Flagged as a quantizer (validation reads the flags); removes the last encoder layer, so the size
    after this stage differs from the size after the previous one."""

    name, stage, start_from, quantizes = "shrink", "after", "finetuned", True

    def apply(self, ctx):
        ctx.model.bert.encoder.layer = ctx.model.bert.encoder.layer[:-1]
        ctx.model.config.num_hidden_layers -= 1
        return Compressed(ctx.model)


class Tweak(Compressor):
    name, stage, start_from = "tweak", "after", "finetuned"


class Lost(Compressor):
    name, stage, start_from = "lost", "after", "pretrained"


class Frozen(Compressor):
    name, stage, start_from = "frozen", "before", "pretrained"


class Sideways(Compressor):
    name, stage = "sideways", "sometime"


FAKES = {c.name: c for c in (Vocab, Distill, QAT, Prune, Shrink, Tweak, Lost, Frozen, Sideways)}


def chain(*names):
    return [FAKES[n]() for n in names]


# ---- order ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [
    ("prune", "shrink"), ("vocab", "qat"), ("vocab", "shrink"), ("distill", "prune", "shrink"),
    ("distill", "qat"), ("prune",), ("frozen", "vocab"), ("prune", "tweak", "shrink"), ("vocab", "prune", "shrink"),
])
def test_valid_chains_pass(names):
    validate_chain(chain(*names))


@pytest.mark.parametrize("names, why", [
    (("shrink", "vocab"), "'vocab' acts before fine-tuning but comes after 'shrink'"),
    (("prune", "vocab"), "Order the stages before -> during -> after"),
    (("qat", "shrink"), "two quantizations ('qat', 'shrink')"),
    (("shrink", "prune"), "'prune' comes after the quantization 'shrink' and fine-tunes, and int8 weights cannot be trained"),
    (("shrink", "tweak"), "would edit int8 weights"),
    (("vocab", "vocab"), "'vocab' starts from the pretrained model, but the chain has already fine-tuned it (after 'vocab')"),
    (("vocab", "distill"), "'distill' starts from the fine-tuned base, but after 'vocab' the model is a different"),
    (("qat", "distill"), "'distill' comes after the quantization 'qat'"),
    (("lost",), "'lost' acts after fine-tuning but declares start_from 'pretrained'"),
    (("prune", "distill"), "'distill' acts during fine-tuning but comes after 'prune'"),
    (("frozen", "shrink"), "'shrink' acts on a fine-tuned model, but nothing before it fine-tunes"),
    (("frozen",), "no stage fine-tunes the pretrained model"),
    (("sideways",), "declares stage 'sometime'"),
])
def test_invalid_chains_are_rejected_with_the_reason(names, why):
    with pytest.raises(ConfigError) as err:
        validate_chain(chain(*names))
    msg = str(err.value)
    assert msg.startswith(f"invalid compressor chain {' -> '.join(names)}: ")
    assert why in msg


def test_messages_use_the_config_names():
    with pytest.raises(ConfigError, match="invalid compressor chain dq -> vt50: 'vt50' acts before"):
        validate_chain(chain("shrink", "vocab"), names=["dq", "vt50"])


def _fake_run():
    """The real RunContext with its training and measuring replaced: records each fine-tuning, the teacher
    it saw and the tokenizers the data module was given, so ``experiment.execute`` runs as in a run."""
    from omegaconf import OmegaConf
    from transformers import BertConfig, BertForSequenceClassification

    from subgroup_robustness.experiment import RunContext

    class FakeRun(RunContext):
        def new_module(self):
            return types.SimpleNamespace(model=self.model)

        def fit(self, module, phase, *args, **kwargs):
            assert module.model is self.model
            self.fits.append(phase)
            self.teachers.append(getattr(self.teacher, "teacher_of", self.teacher))

        def latency(self):
            return 1.5

    data = types.SimpleNamespace(tokenizers=[])
    data.set_tokenizer = data.tokenizers.append
    run = FakeRun(cfg=OmegaConf.create({"seed": 0}), data=data, workdir=Path("."))
    run.model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=32))
    run.tokenizer, run.base = object(), {"key": "k"}
    run.fits, run.teachers = [], []
    return run


@pytest.mark.parametrize("names, fits, teachers", [
    (("vocab", "distill", "prune", "shrink"), ["finetune_vocab+distill", "finetune_prune"], ["distill", None]),
    (("vocab", "qat"), ["finetune_vocab+qat"], [None]),
    (("prune", "tweak"), ["finetune_prune"], [None]),
    (("vocab", "vocab"), ["finetune_vocab", "finetune_vocab"], [None, None]),
    (("distill", "qat", "prune"), ["finetune_distill+qat", "finetune_prune"], ["distill", None]),
])
def test_fit_schedule_is_what_the_experiment_does(names, fits, teachers):
    from subgroup_robustness.experiment import execute

    stages = chain(*names)
    ctx = _fake_run()
    module, reports = execute(ctx, stages)
    assert ctx.fits == fits
    assert sum(fit_schedule(stages)) == len(fits) and fit_schedule(stages)[-1] == stages[-1].trains
    assert [r["name"] for r in reports] == list(names)
    # the teacher lives for the fine-tuning right after the stage that returned it, and no longer
    assert ctx.teachers == teachers and ctx.teacher is None
    # a new tokenizer is taken and the data re-tokenised with it, once per stage that returned one
    assert len(ctx.data.tokenizers) == names.count("vocab")
    if "vocab" in names:
        assert ctx.tokenizer is ctx.data.tokenizers[-1] and ctx.tokenizer.made_by == "vocab"
    # every stage is measured before and after by the run, whatever the compressor
    assert all(r["cpu_latency_ms_per_example"] == {"before": 1.5, "after": 1.5} for r in reports)
    assert all(r["figures"]["params"] > 0 for r in reports)
    assert module is None or module.model is ctx.model  # the last module fine-tuned, if the model is still its


def test_without_stages_the_run_fine_tunes_unless_it_is_the_cached_base():
    from subgroup_robustness.experiment import execute

    ctx = _fake_run()
    module, reports = execute(ctx, [])
    assert reports == [] and ctx.fits == [] and module.model is ctx.model  # the cached base: nothing to do
    ctx.base = None  # cache_base=false
    execute(ctx, [])
    assert ctx.fits == ["finetune"]


# ---- expansion ------------------------------------------------------------------------------------------
FAKE_CONFIGS = {
    # ${compressor.fraction} must resolve against the member, ${seed} against the run
    "fake_prune": "name: fake_prune\nfamily: pruning\nfraction: 0.5\nstages:\n"
                  "  - {_target_: tests.compression.test_chain.Prune, fraction: '${compressor.fraction}', seed: '${seed}'}\n",
    "fake_quant": "name: fake_quant\nfamily: quantization\nstages:\n  - {_target_: tests.compression.test_chain.Shrink}\n",
    "fake_pair": "defaults:\n  - chain\n  - _self_\nname: fake_pair\nchain: [fake_prune, fake_quant]\n",
    "fake_loop": "defaults:\n  - chain\n  - _self_\nchain: [fake_prune, fake_loop]\n",
}


@pytest.fixture(scope="module")
def fake_conf(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_conf")
    (root / "compressor").mkdir()
    for name, text in FAKE_CONFIGS.items():
        (root / "compressor" / f"{name}.yaml").write_text(text)
    return root


def _composed(fake_conf, *overrides):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose([f"hydra.searchpath=['file://{fake_conf}']", "seed=7", *overrides])
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_expand_concatenates_member_stages(fake_conf):
    cfg = _composed(fake_conf, "compressor=chain", "compressor.chain=[fake_prune,fake_quant]")
    expand_chain(cfg)
    c = cfg.compressor
    assert c.name == "fake_prune+fake_quant" and c.family == "pruning+quantization"
    assert list(c.members) == ["fake_prune", "fake_quant"]
    assert OmegaConf.to_container(c.stages) == [
        {"_target_": "tests.compression.test_chain.Prune", "fraction": 0.5, "seed": 7},
        {"_target_": "tests.compression.test_chain.Shrink"},
    ]
    once = OmegaConf.to_container(c)
    assert OmegaConf.to_container(expand_chain(cfg).compressor) == once  # expanding twice changes nothing


def test_a_chain_member_may_itself_be_a_chain(fake_conf):
    cfg = _composed(fake_conf, "compressor=chain", "compressor.chain=[fake_pair]")
    expand_chain(cfg)
    assert list(cfg.compressor.members) == ["fake_prune", "fake_quant"]
    cfg = _composed(fake_conf, "compressor=fake_pair")  # a named chain keeps its own name
    expand_chain(cfg)
    assert cfg.compressor.name == "fake_pair" and len(cfg.compressor.stages) == 2


@pytest.mark.parametrize("chain_value, why", [
    ("[fake_prune,no_such]", "names 'no_such', but there is no config compressor/no_such.yaml"),
    ("[]", "compressor.chain is empty"),
    ("[fake_loop]", "contains itself"),
    ("[none]", "compressor 'none' has no stages"),
])
def test_bad_chain_configs_are_clear_errors(fake_conf, chain_value, why):
    cfg = _composed(fake_conf, "compressor=chain", f"compressor.chain={chain_value}")
    with pytest.raises(ConfigError, match=why) as err:
        expand_chain(cfg)
    if "no_such" in chain_value:
        assert "fake_quant" in str(err.value) and "chain" in str(err.value)  # lists what exists


def test_configs_without_chain_are_untouched():
    cfg = compose([])
    before = OmegaConf.to_container(cfg.compressor)
    assert expand_chain(cfg).compressor == before


# ---- end to end ------------------------------------------------------------------------------------------
def test_chain_run_reports_every_stage(tiny_model_dir, redditbias_root, sr_env, fake_conf):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, f"hydra.searchpath=['file://{fake_conf}']",
                                        "compressor=chain", "compressor.chain=[fake_prune,fake_quant]"))
    assert rec["status"] == "completed"
    assert rec["run"]["compressor"] == "fake_prune+fake_quant"
    stages = rec["compression"]["stages"]
    assert [s["name"] for s in stages] == ["prune", "shrink"]
    assert stages[0]["ffn"] == 32  # the tiny BERT's 64 FFN neurons, halved
    base, pruned, shrunk = rec["base"]["figures"], stages[0]["figures"], stages[1]["figures"]
    assert base["params"] > pruned["params"] > shrunk["params"]
    assert base["size_bytes"] > pruned["size_bytes"] > shrunk["size_bytes"]
    assert (pruned["layers"], shrunk["layers"]) == (2, 1)
    assert rec["model"]["params"] == shrunk["params"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["compressor"]["members"] == ["fake_prune", "fake_quant"]
    assert [p["phase"] for p in rec["phases"]] == ["base_finetune", "finetune_prune"]  # one fit each


def test_invalid_chain_fails_before_any_training(tiny_model_dir, redditbias_root, sr_env, fake_conf):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from subgroup_robustness.run import task

    out = sr_env / "bad"
    overrides = tiny_overrides(tiny_model_dir, redditbias_root, out, f"hydra.searchpath=['file://{fake_conf}']",
                               "compressor=chain", "compressor.chain=[fake_quant,fake_prune]")
    why = "'fake_prune' comes after the quantization 'fake_quant'"
    with pytest.raises(ConfigError, match=why):
        run_in_process(overrides)  # the config check, before the run starts
    # through the entry point, the refused job still leaves a results.json saying why
    cfg = compose(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.run.dir
        del cfg["hydra"]
    with pytest.raises(SystemExit) as exit_:
        task(cfg)
    assert exit_.value.code == 2
    saved = json.loads((out / "results.json").read_text())
    assert why in saved["error"]["message"]
    assert saved["status"] == "failed" and saved["error"]["type"] == "ConfigError"
    assert not (sr_env / "cache" / "bases").exists()  # no base was fine-tuned
    assert not saved.get("phases")


def test_cli_loads_chain_members_through_the_running_app(sr_env, fake_conf):
    """Inside @hydra.main the members come from the app's own Hydra (its search path included)."""
    res = run_cli([f"hydra.searchpath=['file://{fake_conf}']", "compressor=chain",
                   "compressor.chain=[fake_quant,fake_prune]", "logger=none", "print_config=false"],
                  cwd=sr_env, env={"PYTHONPATH": str(REPO)}, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "invalid compressor chain fake_quant -> fake_prune: 'fake_prune' comes after the quantization" in out.replace("\n", "")


# ---- the grid ------------------------------------------------------------------------------------------
def test_chains_experiment_is_a_grid_of_valid_chains():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose(["experiment=chains"])
    assert cfg.compressor.name == "chain" and cfg.experiment_name == "chains"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    spec = cfg.hydra.sweeper.params["compressor.chain"]
    override = OverridesParser.create().parse_overrides([f"compressor.chain={spec}"])[0]
    chains = [list(v) for v in override.sweep_iterator()]
    assert ["pr40", "dq"] in chains and ["distill", "pr40", "dq"] in chains and len(chains) == 7
    available = {p.stem for p in (CONF / "compressor").glob("*.yaml")}
    from subgroup_robustness.experiment import build_stages

    for names in chains:
        missing = set(names) - available
        assert not missing, f"experiment=chains names {missing}, which conf/compressor lacks"
        cfg = compose(["compressor=chain", f"compressor.chain=[{','.join(names)}]"])
        expand_chain(cfg)
        build_stages(cfg.compressor)  # instantiates the real compressors and validates the order


def test_real_pr40_dq_chain(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "compressor=chain",
                                        "compressor.chain=[pr40,dq]"))
    assert rec["status"] == "completed" and rec["run"]["compressor"] == "pr40+dq"
    stages = rec["compression"]["stages"]
    assert len(stages) == 2 and stages[0]["family"] != stages[1]["family"]
    base, pruned, quant = rec["base"]["figures"], stages[0]["figures"], stages[1]["figures"]
    assert pruned["params"] < base["params"]  # heads removed
    assert sum(pruned["heads_per_layer"]) < sum(base["heads_per_layer"])
    assert quant["size_bytes"] < pruned["size_bytes"]  # int8 weights
    assert any("int8" in k for k in quant["weight_dtypes"])
    assert rec["model"]["eval_device"] == "cpu"
    assert Path(out / "results.json").exists()
    for st in stages:  # CPU latency is measured by the run around every stage (dq used to report its own)
        latency = st["cpu_latency_ms_per_example"]
        assert latency["before"] > 0 and latency["after"] > 0, (st["name"], latency)
    saved = json.loads((out / "results.json").read_text())
    assert saved["compression"]["stages"][1]["cpu_latency_ms_per_example"] == stages[1]["cpu_latency_ms_per_example"]
