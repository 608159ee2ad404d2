"""Group-aware training objectives: exact weights, the group-DRO update, a toy problem where they must
help the hard group, and end-to-end runs on the tiny model."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from subgroup_robustness.data.groups import Grouping, build_grouping
from subgroup_robustness.models.objectives import ERM, GroupDRO, GroupReweight, group_balancing_weights
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import compose, run_in_process, tiny_overrides


def grouping(n_groups: int) -> Grouping:
    """Groups by metadata column 1 (column 0 is the label, as in every batch)."""
    return Grouping(name="groups", group_names=[f"g{g}" for g in range(n_groups)],
                    conditions=[[(1, g)] for g in range(n_groups)], disjoint=True, columns=["label", "g"])


def meta(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels, groups], 1)


# ---- reweighting ---------------------------------------------------------------------------------------
def test_reweighting_weights_are_inverse_frequencies():
    counts = torch.tensor([90, 10, 0, 20])
    w = group_balancing_weights(counts)
    n, g = 120, 3  # examples, non-empty groups
    assert torch.allclose(w, torch.tensor([n / (g * 90), n / (g * 10), 0.0, n / (g * 20)], dtype=torch.float64))
    assert w[1] / w[0] == pytest.approx(9.0) and w[1] / w[3] == pytest.approx(2.0)
    assert float((w * counts).sum()) == pytest.approx(n)  # mean weight over training examples is 1


def test_reweighted_loss_is_the_group_balanced_risk():
    torch.manual_seed(0)
    groups = torch.tensor([0] * 30 + [1] * 6 + [2] * 12)
    labels, logits = torch.randint(0, 2, (48,)), torch.randn(48, 2)
    obj = GroupReweight()
    obj.setup(grouping(3), torch.bincount(groups, minlength=3))
    loss = obj(logits, labels, meta(labels, groups))
    ce = F.cross_entropy(logits, labels, reduction="none")
    balanced = torch.stack([ce[groups == k].mean() for k in range(3)]).mean()
    assert loss.item() == pytest.approx(balanced.item(), rel=1e-5)  # on the whole training set
    assert loss.item() != pytest.approx(ce.mean().item(), rel=1e-3)  # and not ERM's


# ---- group DRO -----------------------------------------------------------------------------------------
def _fixed_batch(losses_per_group: list[float], per_group: int = 4):
    """Logits whose cross-entropy is exactly the given value for every example of a group."""
    groups = torch.arange(len(losses_per_group)).repeat_interleave(per_group)
    p = torch.exp(-torch.tensor(losses_per_group))[groups]  # probability of the true class 0
    logits = torch.stack([torch.log(p), torch.log1p(-p)], 1)
    labels = torch.zeros_like(groups)
    return logits, labels, meta(labels, groups)


def test_dro_update_follows_group_dro():
    losses, eta = [0.2, 1.0, 0.5], 0.1
    obj = GroupDRO(step_size=eta)
    obj.setup(grouping(3), torch.tensor([50, 5, 20]))
    assert torch.allclose(obj.q, torch.full((3,), 1 / 3))
    logits, labels, m = _fixed_batch(losses)
    for step in range(1, 6):
        loss = obj(logits, labels, m)
        expected = torch.softmax(eta * step * torch.tensor(losses), 0)  # q_g ∝ exp(eta * sum of its losses)
        assert torch.allclose(obj.q, expected, atol=1e-6)
        assert loss.item() == pytest.approx(float(expected @ torch.tensor(losses)), rel=1e-5)
    assert obj.q.argmax().item() == 1  # the group with the largest loss gets the most weight
    obj.eval()  # validation never moves q
    before = obj.q.clone()
    obj(logits, labels, m)
    assert torch.equal(obj.q, before)


def test_dro_generalisation_adjustment_favours_small_groups():
    obj = GroupDRO(step_size=0.5, adjustment=2.0)
    counts = torch.tensor([100, 4])
    obj.setup(grouping(2), counts)
    logits, labels, m = _fixed_batch([0.7, 0.7])  # equal losses: only C / sqrt(n_g) differs
    obj(logits, labels, m)
    expected = torch.softmax(0.5 * (0.7 + 2.0 / counts.double().sqrt()), 0).float()
    assert torch.allclose(obj.q, expected, atol=1e-6) and obj.q[1] > obj.q[0]


def test_dro_keeps_empty_groups_at_zero_and_logs_its_weights():
    obj = GroupDRO(step_size=1.0)
    obj.setup(grouping(3), torch.tensor([10, 0, 10]))
    logits, labels, m = _fixed_batch([0.3, 5.0, 0.9])
    obj(logits, labels, m)
    assert obj.q[1] == 0 and obj.q.sum().item() == pytest.approx(1.0)
    logged = obj.epoch_log()
    assert set(logged) >= {"train/dro_q/g0", "train/dro_q/g1", "train/dro_q/g2", "train/dro_loss/g0"}
    assert logged["train/dro_loss/g2"] == pytest.approx(0.9, rel=1e-4)
    assert obj.epoch_log()["train/dro_q/g2"] == logged["train/dro_q/g2"]  # epoch losses reset, q kept
    assert "train/dro_loss/g2" not in obj.epoch_log()
    assert "q" in obj.state_dict()  # travels with checkpoints and the module's device


@pytest.fixture()
def one_thread():
    """These toys are a few thousand tiny ops: with the machine's threads busy, one thread is 10x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _conflict_toy():
    """Majority (90%): label = [x0 > 0], x1 noise. Minority (10%): label = [x1 > 0], x0 noise. One linear
    model cannot fit both; ERM sides with the majority, so the minority is the worst group."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g)
    groups = torch.tensor([0] * 450 + [1] * 50)
    labels = torch.where(groups == 0, x[:, 0] > 0, x[:, 1] > 0).long()
    return x, labels, groups


def _noisy_minority_toy():
    """Each group has its own feature, so nothing conflicts, but 25% of the minority's labels are flipped:
    its loss cannot drop below ~0.5 while the majority's keeps falling. It stays the hard group."""
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 450 + [1] * 50)
    x = torch.randn(500, 2, generator=g) * torch.where((groups == 0).unsqueeze(1), torch.tensor([1.0, 0.0]),
                                                       torch.tensor([0.0, 1.0]))
    labels = (x.sum(1) > 0).long()
    flip = (torch.rand(500, generator=g) < 0.25) & (groups == 1)
    return x, torch.where(flip, 1 - labels, labels), groups


def _train(objective, toy, steps: int = 200):
    """Full-batch SGD on a linear model; returns per-group accuracy and the minority's q after each step."""
    x, labels, groups = toy()
    objective.setup(grouping(2), torch.bincount(groups))
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    objective.train()
    q_minority = []
    for _ in range(steps):
        opt.zero_grad()
        objective(model(x), labels, meta(labels, groups)).backward()
        opt.step()
        if isinstance(objective, GroupDRO):
            q_minority.append(objective.q[1].item())
    with torch.no_grad():
        correct = model(x).argmax(1) == labels
    return [correct[groups == k].float().mean().item() for k in range(2)], q_minority


def test_dro_weights_move_toward_the_hard_group(one_thread):
    dro = GroupDRO(step_size=0.05)
    _, q = _train(dro, _noisy_minority_toy)
    assert q[0] == pytest.approx(0.5, abs=0.01)  # starts uniform
    assert q[49] < q[99] < q[-1] and q[-1] > 0.9  # and keeps moving to the minority, whose loss stays high
    logged = dro.epoch_log()
    assert logged["train/dro_loss/g1"] > logged["train/dro_loss/g0"]
    again = GroupDRO(step_size=0.05)
    assert _train(again, _noisy_minority_toy)[1] == q and torch.equal(again.q, dro.q)  # deterministic


def test_group_objectives_lift_the_worst_group(one_thread):
    erm_acc, _ = _train(ERM(), _conflict_toy)
    assert erm_acc[1] < 0.7 < erm_acc[0]  # the toy is what it claims: ERM neglects the minority
    dro_acc, q = _train(GroupDRO(step_size=0.05), _conflict_toy)
    assert min(q) > 0.4  # the minority keeps about half the weight, against its 10% share under ERM
    assert min(dro_acc) > min(erm_acc) + 0.1
    rw_acc, _ = _train(GroupReweight(), _conflict_toy)
    assert min(rw_acc) > min(erm_acc) + 0.1


def test_group_objectives_refuse_what_they_cannot_do():
    overlapping = build_grouping("groups", {"each": ["a", "b"], "by": ["label"]},
                                 {"name": "toy", "label_names": ["n", "y"], "attributes": {"a": ["0", "1"], "b": ["0", "1"]}})
    with pytest.raises(ConfigError, match="needs one group per example.*overlaps"):
        GroupDRO().setup(overlapping, torch.tensor([3, 3, 3, 3]))
    with pytest.raises(RuntimeError, match="before setup"):
        GroupReweight()(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="step_size must be > 0"):
        GroupDRO(step_size=0)
    with pytest.raises(ConfigError, match="no example in any group"):
        GroupReweight().setup(grouping(2), torch.tensor([0, 0]))


def test_each_objective_caches_its_own_base():
    from subgroup_robustness.models.base_cache import base_key

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def key(objective):
        cfg = compose([f"objective={objective}"])
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return base_key(cfg)

    keys = {o: key(o) for o in ("erm", "group_reweight", "group_dro")}
    assert len(set(keys.values())) == 3


# ---- end to end ------------------------------------------------------------------------------------------
def _csv_rows(out):
    files = list(out.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as fh:
        return list(csv.DictReader(fh))


def test_group_dro_run_end_to_end(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "objective=group_dro",
                                        "objective.step_size=0.5", "monitor.metric=val/acc_wg", "logger=csv",
                                        "trainer.max_epochs=2", "callbacks.early_stopping=null"))
    assert rec["status"] == "completed" and rec["run"]["objective"] == "group_dro"
    rows = _csv_rows(out)
    q_cols = [c for c in rows[0] if c.startswith("train/dro_q/")]
    assert len(q_cols) == 10  # RedditBias: label x 5 identities
    q_rows = [r for r in rows if r[q_cols[0]]]
    assert len(q_rows) == 2  # one per epoch
    qs = [[float(r[c]) for c in q_cols] for r in q_rows]
    for q in qs:
        assert sum(q) == pytest.approx(1.0, abs=1e-5)
    assert qs[0] != qs[1] and max(qs[1]) > 0.1 + 1e-3  # moved away from uniform (0.1)
    # model selection on worst-group validation accuracy: the kept epoch is the best by val/acc_wg
    val_wg = [float(r["val/acc_wg"]) for r in rows if r.get("val/acc_wg")]
    assert len(val_wg) == 3  # two fitting epochs, then the evaluation of the kept weights
    assert rec["phases"][0]["best_value"] == pytest.approx(max(val_wg[:2]))
    assert val_wg[2] == pytest.approx(max(val_wg[:2]))
    assert rec["metrics"]["val"]["val/acc_wg"] == pytest.approx(max(val_wg[:2]))


def test_group_reweight_run_end_to_end(tiny_model_dir, redditbias_root, sr_env):
    out = sr_env / "run"
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, out, "objective=group_reweight"))
    assert rec["status"] == "completed" and rec["run"]["objective"] == "group_reweight"
    assert not math.isnan(rec["metrics"]["test"]["test/acc_wg"])
