"""Model sources: a local folder, a head-pruned local folder, a corrupt one."""

import json

import pytest
import torch

from subgroup_robustness.compression.pruning import head_scores, select_heads
from subgroup_robustness.models.loading import load_model
from subgroup_robustness.models.surgery import prune_heads
from subgroup_robustness.utils.errors import ModelUnavailableError
from tests.helpers import make_tiny_bert


def test_local_folder_gets_a_fresh_head_of_the_right_size(tiny_model_dir):
    model, tok = load_model({"name": "local", "source": "local", "path": str(tiny_model_dir)}, 3)
    assert model.classifier.out_features == 3 and tok.pad_token == "[PAD]"


def test_head_pruned_local_folder_keeps_its_shape_and_logits(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    model, tok = load_model({"name": "local", "source": "local", "path": str(folder)}, 2)
    prune_heads(model, select_heads(head_scores(model), 0.5))
    model.eval()
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    again, _ = load_model({"name": "local", "source": "local", "path": str(out)}, 2)
    again.eval()
    x = torch.randint(5, 100, (2, 9))
    assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    with pytest.raises(ModelUnavailableError, match="2 labels"):
        load_model({"name": "local", "source": "local", "path": str(out)}, 3)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the saved FFN weights are 64 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelUnavailableError, match="do not fit"):
        load_model({"name": "local", "source": "local", "path": str(folder)}, 2)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelUnavailableError, match="model.path"):
        load_model({"name": "local", "source": "local", "path": str(tmp_path / "nope")}, 2)
