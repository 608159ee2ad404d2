"""One-shot pruning: Wanda and magnitude choose different weights when activations are unequal; SparseGPT
reconstructs a layer's output better than magnitude pruning at the same sparsity; 2:4 holds in every
group of every pruned Linear; layers are pruned in order on the already-pruned model; refit keeps the
masks through training; the chains' flags; every new YAML composes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from subgroup_robustness.compression.context import SimpleContext
from subgroup_robustness.compression.sparsity import (OneShotMagnitude, SparseGPT, Wanda, magnitude_prune,
                                                      nm_keep_mask, nm_violations, observe_inputs,
                                                      parse_pattern, prunable_linears, sparsegpt_prune,
                                                      wanda_prune)
from subgroup_robustness.utils.errors import ConfigError
from tests.data.test_calibration import fake_datamodule

CAL = {"source": "natural", "examples": 48, "seed": 0}


def tiny(seed: int = 0, hidden: int = 32, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def run(compressor, model=None):
    ctx = SimpleContext(model if model is not None else tiny(), data=fake_datamodule())
    return ctx.update(compressor.apply(ctx)), ctx.model


# ---- the criteria on constructed layers ---------------------------------------------------------------
def test_wanda_and_magnitude_choose_different_weights_when_activations_are_unequal():
    w = torch.tensor([[1.0, 0.9, 0.5, 0.4],
                      [0.3, -0.8, 0.7, -0.2]])
    # input feature 0 is nearly silent, feature 3 loud: ||X_j||^2
    x = torch.randn(200, 4) * torch.tensor([0.01, 1.0, 1.0, 10.0])
    sq = x.pow(2).sum(0)
    _, mag = magnitude_prune(w, 0.5, None)
    _, wan = wanda_prune(w, sq, 0.5, None)
    assert mag[0].tolist() == [True, True, False, False]  # the two largest |W|
    assert wan[0].tolist() == [False, True, False, True]  # |W| * ||X||: feature 3 beats feature 0
    assert not torch.equal(mag, wan)
    assert (mag.sum(1) == 2).all() and (wan.sum(1) == 2).all()  # both: half of every row
    # the same inputs decide for 2:4 (one group of 4 per row)
    _, wan24 = wanda_prune(w, sq, 0.5, (2, 4))
    assert torch.equal(wan24, wan)


def test_wanda_compressor_uses_calibration_norms():
    m = tiny()
    with torch.no_grad():  # make one input feature of layer 0's query dominate the activations
        m.bert.embeddings.LayerNorm.weight[3] = 50.0
    ref = copy.deepcopy(m)
    run(Wanda(0.5, calibration=CAL), m)
    run(OneShotMagnitude(0.5, "unstructured"), ref)
    q_w = m.bert.encoder.layer[0].attention.self.query.weight
    q_m = ref.bert.encoder.layer[0].attention.self.query.weight
    assert (q_w[:, 3] != 0).all()  # Wanda keeps every weight reading the loud feature
    assert not torch.equal(q_w != 0, q_m != 0)


def test_sparsegpt_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    layer = nn.Linear(64, 24, bias=False)
    mix = torch.randn(64, 64) / 8 + torch.eye(64)  # correlated inputs of unequal scale
    x = (torch.randn(1024, 64) * torch.linspace(0.1, 3.0, 64)) @ mix
    H = 2 * x.t() @ x / len(x)
    w = layer.weight.detach()
    ref = x @ w.t()
    for nm in (None, (2, 4)):
        w_mag, _ = magnitude_prune(w, 0.5, nm)
        w_wan, _ = wanda_prune(w, x.pow(2).sum(0), 0.5, nm)
        w_sg, keep, fig = sparsegpt_prune(w, H, 0.5, nm, blocksize=16)
        err = {name: float((ref - x @ v.t()).norm()) for name, v in
               {"magnitude": w_mag, "wanda": w_wan, "sparsegpt": w_sg}.items()}
        assert err["sparsegpt"] < err["magnitude"], (nm, err)
        assert err["sparsegpt"] < err["wanda"], (nm, err)
        assert float((w_sg == 0).float().mean()) == pytest.approx(0.5)
        assert torch.equal(w_sg != 0, keep)
        assert 0 < fig["relative_error"] < 1
    assert nm_violations(w_sg, 2, 4) == 0


def test_nm_mask_keeps_exactly_n_of_every_m():
    scores = torch.rand(8, 16)
    keep = nm_keep_mask(scores, 2, 4)
    assert (keep.reshape(8, 4, 4).sum(-1) == 2).all()
    assert nm_violations(torch.where(keep, 1.0, 0.0), 2, 4) == 0
    assert nm_violations(torch.ones(8, 16), 2, 4) == 32
    with pytest.raises(ConfigError, match="multiple of M=4"):
        nm_keep_mask(torch.rand(2, 6), 2, 4)


# ---- compressors on the tiny BERT --------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: OneShotMagnitude(0.5, "2:4"),
    lambda: Wanda(0.5, "2:4", calibration=CAL),
    lambda: SparseGPT(None, "2:4", calibration=CAL, blocksize=16),
], ids=["mag24", "wanda24", "sparsegpt24"])
def test_two_four_holds_in_every_block_of_every_pruned_linear(make):
    comp = make()
    m = tiny()
    head = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("classifier", "bert.pooler"))}
    ctx, m = run(comp, m)
    targets = prunable_linears(m, "encoder")
    assert len(targets) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    for fqn, lin in targets:
        w = lin.weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert (groups == 2).all(), fqn  # exactly 2 of every 4 consecutive input weights
    for k, v in head.items():  # scope=encoder: pooler and classifier untouched
        assert torch.equal(m.state_dict()[k], v), k
    rep = comp.report(ctx)
    assert rep["pattern"] == "2:4" and rep["sparsity"] == pytest.approx(0.5) and rep["nm_violations"] == 0
    assert "dense" in rep["storage"]
    assert not comp.trains and comp.quantizes is False and comp.stage == "after"
    if comp.calibrates:
        cal = rep["calibration"]
        assert cal["source"] == "natural" and cal["examples"] == 48 and sum(cal["group_counts"].values()) == 48


def test_unstructured_sparsity_and_scope_all():
    ctx, m = run(Wanda(0.5, calibration=CAL, scope="all"))
    for fqn, lin in prunable_linears(m, "all"):
        assert (lin.weight == 0).sum(1).tolist() == [lin.in_features // 2] * lin.out_features, fqn  # per row
    assert any(f.startswith("classifier") for f, _ in prunable_linears(m, "all"))
    sg = SparseGPT(0.5, calibration=CAL, blocksize=16)
    ctx, m = run(sg)
    rep = sg.report(ctx)
    assert rep["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0 < rep["relative_reconstruction_error_mean"] < 1


def test_layers_are_calibrated_on_the_already_pruned_model():
    seen = []

    class Spy(SparseGPT):
        def statistics(self, model, batches, group, stop_after):
            first = model.bert.encoder.layer[0].attention.self.query.weight
            seen.append((group[0][0], float((first == 0).float().mean())))
            return super().statistics(model, batches, group, stop_after)

    run(Spy(0.5, calibration=CAL, blocksize=16))
    assert [name.split(".")[3] for name, _ in seen] == ["0", "1"]  # layer order
    assert seen[0][1] == 0.0 and seen[1][1] == pytest.approx(0.5, abs=0.01)  # layer 1 saw a pruned layer 0


def test_statistics_leave_out_padding():
    m = tiny()
    lin = m.bert.encoder.layer[0].intermediate.dense
    ids = torch.randint(5, 120, (1, 7))
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)}
    rows = {}
    for name, batch in (("alone", alone), ("padded", padded)):
        observe_inputs(m, [batch], [("x", lin)], lambda fqn, r: rows.__setitem__(name, r), m.bert.encoder.layer[0])
    assert rows["alone"].shape == rows["padded"].shape == (7, 32)
    assert torch.allclose(rows["alone"], rows["padded"], atol=1e-5)


def test_refit_keeps_the_masks_through_training_and_finalize_bakes_them():
    comp = Wanda(0.5, "2:4", calibration=CAL, refit=True)
    assert comp.trains
    ctx, m = run(comp)
    lin = m.bert.encoder.layer[0].output.dense
    assert hasattr(lin, "weight_mask") and hasattr(lin, "weight_orig")
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    ids = torch.randint(5, 120, (4, 9))
    m(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    comp.finalize(ctx)
    assert not hasattr(lin, "weight_orig") and isinstance(lin.weight, nn.Parameter)
    for _, l in prunable_linears(m, "encoder"):
        assert nm_violations(l.weight.detach(), 2, 4) == 0


def test_arguments_are_checked_before_training():
    with pytest.raises(ConfigError, match="sparsity 0.5"):
        Wanda(0.3, "2:4")
    with pytest.raises(ConfigError, match="pattern"):
        Wanda(0.5, "half")
    with pytest.raises(ConfigError, match="scope"):
        OneShotMagnitude(0.5, scope="decoder")
    with pytest.raises(ConfigError, match="calibration.source"):
        SparseGPT(0.5, calibration={"source": "test"})
    with pytest.raises(ConfigError, match="multiple of M"):
        SparseGPT(None, "2:4", blocksize=30)
    with pytest.raises(ConfigError, match="refit"):
        Wanda(0.5, refit="yes")
    assert parse_pattern("2:4", None, "x") == (0.5, (2, 4))


# ---- configs and chains -------------------------------------------------------------------------------
NEW = ["wanda50", "wanda24", "sparsegpt50", "sparsegpt24", "mag24", "int8wo", "int4wo", "w8a8", "ffn25",
       "ffn50", "drop2", "drop3"]


def test_every_new_yaml_composes_and_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.helpers import compose

    for name in NEW:
        cfg = compose([f"compressor={name}", "seed=5"])
        stages = [instantiate(s) for s in OmegaConf.to_container(cfg.compressor.stages, resolve=True)]
        assert len(stages) == 1 and cfg.compressor.name == name
        cal = getattr(stages[0], "calibration", None)
        if cal is not None:
            assert cal == {"source": "natural", "examples": 256, "seed": 5}
    assert compose(["compressor=wanda24"]).compressor.pattern == "2:4"  # quoted: not YAML 1.1's base 60


def test_cli_prints_the_wanda24_job_config():
    from tests.helpers import REPO, run_cli

    out = run_cli(["compressor=wanda24", "--cfg", "job", "-p", "compressor"], cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "subgroup_robustness.compression.sparsity.Wanda" in out.stdout and "'2:4'" in out.stdout


@pytest.mark.parametrize("chain,ok", [(["wanda50", "int8wo"], True), (["sparsegpt24", "w8a8"], True),
                                      (["mag24", "int4wo"], True), (["int8wo", "wanda50"], False),
                                      (["wanda50", "int8wo", "int4wo"], False)])
def test_chain_flags(chain, ok):
    from subgroup_robustness.compression.chain import expand_chain
    from subgroup_robustness.experiment import build_stages
    from tests.helpers import compose

    cfg = compose(["compressor=chain", f"compressor.chain=[{','.join(chain)}]"])
    expand_chain(cfg)
    if ok:
        build_stages(cfg.compressor)
    else:
        with pytest.raises(ConfigError, match="invalid compressor chain"):
            build_stages(cfg.compressor)


def test_experiment_configs_compose():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tests.helpers import compose

    cfg = compose(["experiment=modern"])
    rows = cfg.hydra.sweeper.params["compressor"].split(",")
    assert {"none", "refit", "wanda24", "sparsegpt50", "int4wo", "ffn25", "drop3"} <= set(rows)
    cfg = compose(["experiment=calibration"])
    params = cfg.hydra.sweeper.params
    assert params["compressor"] == "sq,wanda50,sparsegpt50" and params["seed"] == "1,2,3"
    sources = OverridesParser.create().parse_overrides([f"s={params['compressor.calibration.source']}"])[0]
    assert list(sources.sweep_iterator()) == ["natural", "group_balanced", "worst_group"]
    assert cfg.compressor.calibration.examples == 256
    # one report experiment: the report names each source's row <method>@<source>
    cfg = compose(["experiment=calibration", "compressor=wanda50", "compressor.calibration.source=worst_group"])
    assert cfg.experiment_name == "calibration" and cfg.compressor.name == "wanda50"
