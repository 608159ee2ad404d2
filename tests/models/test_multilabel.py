"""The multi-label path (dataset.task: multilabel, ECtHR): bitmask labels decoded to multi-hot targets,
BCE-with-logits, 0.5-threshold predictions as bitmasks, per-group micro-/macro-F1 and FairLex's group
disparity checked by hand, its flat keys, the single-label path unchanged, and ECtHR end to end through the
real command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from subgroup_robustness.metrics.group_metrics import (
    GroupAccuracy, GroupMultiLabelF1, bits, flatten_metrics, group_metric, to_bitmask,
)
from subgroup_robustness.models.classifier import SequenceClassifier, label_sets, multi_hot
from subgroup_robustness.models.objectives import GroupDRO
from subgroup_robustness.utils.errors import ConfigError
from tests.data.fixtures import write_fairlex
from tests.data.multilingual_fixtures import fairlex_parts
from tests.helpers import REPO, run_cli


def _f1(t: np.ndarray, p: np.ndarray) -> float:
    tp, fp, fn = (t & p).sum(), ((1 - t) & p).sum(), (t & (1 - p)).sum()
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _by_hand(target: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(micro-F1, macro-F1) as scikit-learn's f1_score(..., zero_division=0), FairLex's call."""
    micro = _f1(target.ravel(), pred.ravel())
    macro = float(np.mean([_f1(target[:, k], pred[:, k]) for k in range(target.shape[1])]))
    return micro, macro


def test_bitmasks_round_trip():
    hot = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    masks = to_bitmask(hot)
    assert masks.tolist() == [5, 0, 15]
    assert bits(masks, 4).tolist() == hot.tolist()
    assert multi_hot(masks, 4).tolist() == hot.float().tolist()
    preds, probs = label_sets(torch.tensor([[2.0, -1.0, 0.1, -0.1]]))
    assert preds.tolist() == [1 + 4] and torch.allclose(probs, torch.sigmoid(torch.tensor([[2.0, -1.0, 0.1, -0.1]])))


def test_group_f1_by_hand_with_an_empty_group():
    rng = np.random.default_rng(0)
    n, c = 60, 5
    target = (rng.random((n, c)) < 0.3).astype(int)
    pred = (rng.random((n, c)) < 0.3).astype(int)
    target[:, 4] = 0  # a label never present: it scores 0 in macro-F1 wherever it is predicted or not
    groups = rng.integers(0, 2, n)
    masks = torch.zeros(n, 3, dtype=torch.bool)
    masks[np.arange(n), groups] = True  # group 2 stays empty
    metric = GroupMultiLabelF1(["a", "b", "c"], c)
    for chunk in np.array_split(np.arange(n), 4):  # several batches
        metric.update(to_bitmask(torch.tensor(pred[chunk])), to_bitmask(torch.tensor(target[chunk])), masks[chunk])
    res = metric.compute()
    micro_all, macro_all = _by_hand(target, pred)
    assert res["micro_f1_avg"] == pytest.approx(micro_all) and res["macro_f1_avg"] == pytest.approx(macro_all)
    per = {g: _by_hand(target[groups == i], pred[groups == i]) for i, g in enumerate(("a", "b"))}
    for g, (mi, ma) in per.items():
        assert res["micro_f1"][g] == pytest.approx(mi) and res["macro_f1"][g] == pytest.approx(ma)
    assert math.isnan(res["micro_f1"]["c"]) and res["count"] == {"a": int((groups == 0).sum()),
                                                                 "b": int((groups == 1).sum()), "c": 0}
    assert res["macro_f1_wg"] == pytest.approx(min(ma for _, ma in per.values()))
    assert res["micro_f1_wg"] == pytest.approx(min(mi for mi, _ in per.values()))
    assert res["worst_group"] == min(per, key=lambda g: per[g][1])
    assert res["gd_macro_f1"] == pytest.approx(float(np.std([ma for _, ma in per.values()])))  # population std
    assert res["gd_micro_f1"] == pytest.approx(float(np.std([mi for mi, _ in per.values()])))


def test_flat_keys_of_a_multilabel_result():
    metric = GroupMultiLabelF1(["x", "y"], 3)
    metric.update(torch.tensor([1, 3, 0]), torch.tensor([1, 1, 4]), torch.tensor([[1, 0], [1, 0], [1, 0]]).bool())
    res = metric.compute()
    flat = flatten_metrics("test", None, res)
    assert set(flat) == {"test/micro_f1_avg", "test/macro_f1_avg", "test/micro_f1_wg", "test/macro_f1_wg",
                         "test/gd_micro_f1", "test/gd_macro_f1", "test/micro_f1/x", "test/macro_f1/x",
                         "test/count/x", "test/count/y"}  # the empty group: its count only
    second = flatten_metrics("val", "gender", res)
    assert "val/gender/macro_f1_wg" in second and "val/gender/micro_f1_avg" not in second
    assert not any("acc" in k for k in [*flat, *second])
    assert isinstance(group_metric(["x"]), GroupAccuracy) and isinstance(group_metric(["x"], True, 3), GroupMultiLabelF1)


class _Tiny(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.lin = torch.nn.Linear(4, c)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
        return type("Out", (), {"logits": self.lin(input_ids.float())})()


def _batch(labels):
    x = torch.arange(len(labels) * 4, dtype=torch.long).reshape(len(labels), 4) % 3
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor(labels),
            "metadata": torch.tensor([[v, 0] for v in labels])}


def test_the_classifier_trains_with_bce_and_predicts_bitmasks():
    torch.manual_seed(0)
    module = SequenceClassifier(_Tiny(3), task="multilabel")
    batch = _batch([5, 0, 2])
    logits = module.model(**batch).logits.detach()
    loss = module._supervised_loss(logits, batch).item()
    assert loss == pytest.approx(F.binary_cross_entropy_with_logits(logits, multi_hot(batch["labels"], 3)).item())
    out = module._eval_step(batch)
    assert out["preds"].tolist() == to_bitmask(torch.sigmoid(logits) > 0.5).tolist()
    assert torch.allclose(out["probs"], torch.sigmoid(logits))


def test_the_single_label_path_is_unchanged():
    torch.manual_seed(0)
    module = SequenceClassifier(_Tiny(3))
    batch = _batch([2, 0, 1])
    logits = module.model(**batch).logits.detach()
    assert module._supervised_loss(logits, batch).item() == pytest.approx(F.cross_entropy(logits, batch["labels"]).item())
    out = module._eval_step(batch)
    assert set(out) == {"preds", "probs"}
    assert out["preds"].tolist() == logits.argmax(-1).tolist() and torch.allclose(out["probs"], logits.softmax(-1))


def test_the_task_follows_the_datamodule_and_refuses_group_objectives():
    class DM:
        cfg = {"name": "ecthr", "task": "multilabel"}

    class Trainer:
        datamodule = DM()

    module = SequenceClassifier(_Tiny(3))
    module._trainer = Trainer()
    module.setup("fit")
    assert module.multilabel
    module = SequenceClassifier(_Tiny(3), objective=GroupDRO())
    module._trainer = Trainer()
    with pytest.raises(ConfigError, match="multi-label dataset trains with BCE-with-logits only"):
        module.setup("fit")
    module = SequenceClassifier(_Tiny(3), task="single_label")
    module._trainer = Trainer()
    with pytest.raises(ConfigError, match="module.task='single_label' but dataset 'ecthr' is 'multilabel'"):
        module.setup("fit")
    with pytest.raises(ConfigError, match="module.task='multi'"):
        SequenceClassifier(_Tiny(3), task="multi")


def test_ecthr_end_to_end_through_the_command_line(tmp_path):
    """The issue's done-when: python -m subgroup_robustness dataset=ecthr dataset.source.path=<folder>."""
    from tests.helpers import make_tiny_bert

    folder = write_fairlex(tmp_path / "ecthr", fairlex_parts("ecthr", names=True))
    model = make_tiny_bert(tmp_path / "tiny10", num_labels=10)
    out = tmp_path / "run"
    proc = run_cli(["dataset=ecthr", f"dataset.source.path={folder}", "model=local",
                    f"model.path={model}", "dataset.max_length=64", "trainer.max_epochs=2",
                    "trainer.precision=32-true", "logger=none", "print_config=false", "callbacks.progress=null",
                    f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"],
                   cwd=REPO, env={"SR_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "macro-F1" in proc.stdout and "group disparity" in proc.stdout
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "completed"
    test = rec["metrics"]["test"]
    for key in ("test/micro_f1_avg", "test/macro_f1_avg", "test/macro_f1_wg", "test/gd_macro_f1",
                "test/applicant_gender/macro_f1_wg", "test/macro_f1/rest_of_europe"):
        assert 0.0 <= test[key] <= 1.0, key
    assert not any(k.startswith("test/acc") for k in test)
    assert rec["phases"][0]["monitor"] == "val/macro_f1_avg" and rec["phases"][0]["history"]
    z = np.load(out / "predictions.npz")
    assert z["probs"].shape == (36, 10) and z["label"].max() < 1024 and z["metadata"].shape == (36, 4)
