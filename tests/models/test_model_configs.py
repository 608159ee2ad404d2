"""The paper's distilled checkpoints as model configs: each names the paper's source and tokenizer, loads a
small local stand-in saved in the hub repository's format (config.json quirks, .bin weights, vocab-only
tokenizers, DistilBERT's architecture) with the right tokenizer, fine-tunes like any base, and fails at
once, in one line naming the offline alternatives, when the hub is unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from subgroup_robustness.models.loading import load_model
from subgroup_robustness.utils.errors import ModelUnavailableError
from tests.helpers import CONF, compose, run_in_process


pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (weights, tokenizer) as in the authors' main.py (tokenizer None: the checkpoint's own)
PAPER = {
    "bert_base": ("bert-base-uncased", None),
    "bert_medium": ("prajjwal1/bert-medium", "bert-base-uncased"),
    "bert_small": ("prajjwal1/bert-small", "bert-base-uncased"),
    "bert_mini": ("prajjwal1/bert-mini", "bert-base-uncased"),
    "bert_tiny": ("prajjwal1/bert-tiny", "bert-base-uncased"),
    "distilbert": ("distilbert-base-uncased", None),
    "tinybert6": ("huawei-noah/TinyBERT_General_6L_768D", None),
    "tinybert4": ("huawei-noah/TinyBERT_General_4L_312D", None),
}
TURC = ("bert_medium", "bert_small", "bert_mini", "bert_tiny")
TINYBERT = ("tinybert6", "tinybert4")


def _write_vocab(folder: Path, tokens: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


def _bare_config(config, **extra) -> dict:
    """config.json as the 2019/2020 uploads have it: no model_type, no architectures."""
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")}
    return {**d, **extra}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_model_dir):
    """name -> (weights folder, tokenizer folder or None, tokenizer folder expected), in the formats of
    the real repositories."""
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertForPreTraining, DistilBertConfig,
                              DistilBertForMaskedLM)

    root = tmp_path_factory.mktemp("hub")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    torch.manual_seed(0)
    out = {}

    # bert-base-uncased: model.safetensors (BertForMaskedLM), config.json with model_type, tokenizer files
    base = root / "bert-base-uncased"
    bert_cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(bert_cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out["bert_base"] = (base, None, base)

    # prajjwal1/bert-*: converted TF checkpoints: pytorch_model.bin, config.json without model_type; a
    # decoy vocab.txt proves the tokenizer comes from bert-base-uncased as in the paper
    for i, name in enumerate(TURC):
        folder = root / name
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=16 * (i + 1), num_hidden_layers=i + 1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
        folder.mkdir()
        torch.save(BertForPreTraining(cfg).state_dict(), folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(_bare_config(cfg)))
        _write_vocab(folder, vocab[:5] + ["decoy"] + vocab[6:])
        out[name] = (folder, base, base)

    # distilbert-base-uncased: another architecture and its own tokenizer
    folder = root / "distilbert"
    dcfg = DistilBertConfig(vocab_size=len(vocab) + 7, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                            max_position_embeddings=128)
    DistilBertForMaskedLM(dcfg).save_pretrained(folder)
    _write_vocab(folder, vocab + [f"distil{i}" for i in range(7)])
    AutoTokenizer.from_pretrained(folder, tokenizer_type="bert").save_pretrained(folder)
    out["distilbert"] = (folder, None, folder)

    # huawei-noah/TinyBERT_General_*: pytorch_model.bin, TinyBERT's extra config keys, vocab.txt only
    for i, name in enumerate(TINYBERT):
        folder = root / name
        cfg = BertConfig(vocab_size=len(vocab) + 3, hidden_size=24, num_hidden_layers=3 - i, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=128)
        folder.mkdir()
        torch.save(BertForPreTraining(cfg).state_dict(), folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(_bare_config(cfg, cell={}, emb_size=24, pre_trained="",
                                                                    structure=[])))
        _write_vocab(folder, vocab + ["tiny0", "tiny1", "tiny2"])
        out[name] = (folder, None, folder)
    return out


def hub_overrides(name: str, stand_in) -> list[str]:
    weights, tok, _ = stand_in
    return [f"model={name}", f"model.hub_id={weights}"] + ([f"model.tokenizer={tok}"] if tok else [])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_names_the_papers_checkpoint_and_tokenizer(name):
    m = compose([f"model={name}"]).model
    assert (m.name, m.source, m.hub_id, m.tokenizer) == (name, "hub", *PAPER[name])
    assert m.get("model_type") == ("bert" if name in TURC + TINYBERT else None)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_loads_a_stand_in_with_the_right_tokenizer(name, stand_ins):
    from transformers import AutoTokenizer

    weights, _, expected_tok = stand_ins[name]
    cfg = compose(hub_overrides(name, stand_ins[name]))
    model, tok = load_model(cfg.model, 2, ["a", "b"])
    arch = "DistilBertForSequenceClassification" if name == "distilbert" else "BertForSequenceClassification"
    assert type(model).__name__ == arch and model.config.num_labels == 2
    reference = AutoTokenizer.from_pretrained(expected_tok, tokenizer_type="bert")
    assert tok.get_vocab() == reference.get_vocab()
    assert "decoy" not in tok.get_vocab()
    text = "The WOMEN are never lazy"
    assert tok(text)["input_ids"] == reference(text)["input_ids"]  # uncased, [CLS] ... [SEP]
    # the pretrained encoder weights arrive (not a fresh initialisation)
    if (weights / "pytorch_model.bin").exists():
        saved = torch.load(weights / "pytorch_model.bin", weights_only=True)
    else:
        from safetensors.torch import load_file

        saved = load_file(weights / "model.safetensors")
    key = "distilbert.embeddings.word_embeddings.weight" if name == "distilbert" else "bert.embeddings.word_embeddings.weight"
    assert torch.equal(model.get_input_embeddings().weight, saved[key])
    ids = torch.tensor([tok(text)["input_ids"]])
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (1, 2)


def test_turc_checkpoints_need_model_type_under_transformers_5(stand_ins):
    """Without model_type the config.json of prajjwal1/bert-* is unreadable: the reason the configs set it."""
    cfg = compose([*hub_overrides("bert_tiny", stand_ins["bert_tiny"]), "~model.model_type"])
    with pytest.raises(ModelUnavailableError, match="model_type"):
        load_model(cfg.model, 2)


@pytest.mark.parametrize("name", ["distilbert", "bert_tiny"])
def test_distilled_checkpoint_fine_tunes_like_any_base(name, stand_ins, redditbias_root, sr_env):
    out = sr_env / name
    rec = run_in_process([*hub_overrides(name, stand_ins[name]), f"dataset.source.root={redditbias_root}",
                          "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none", "print_config=false",
                          "callbacks.progress=null", f"hydra.run.dir={out}"])
    assert rec["status"] == "completed" and rec["run"]["model"] == name
    saved = json.loads((stand_ins[name][0] / "config.json").read_text())
    assert rec["model"]["layers"] == saved.get("num_hidden_layers", saved.get("n_layers"))
    assert 0.0 <= rec["metrics"]["test"]["test/acc_wg"] <= rec["metrics"]["test"]["test/acc_avg"] <= 1.0


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_offline_fails_at_once_in_one_line(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose([f"model={name}"])
    if _cached(cfg.model.hub_id):
        pytest.skip(f"{cfg.model.hub_id} is in this machine's Hugging Face cache, so it loads offline")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_model(cfg.model, 2)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and cfg.model.hub_id in msg
    assert "model=minilm_l6" in msg and "model=local" in msg


NO_NETWORK = """
import json, sys, time
from omegaconf import OmegaConf
from subgroup_robustness.models.loading import load_model
t0 = time.perf_counter()
try:
    load_model(OmegaConf.load(sys.argv[1]), 2)
    out = {"error": None}
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def test_no_network_without_hf_hub_offline_still_fails_fast(tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable (a black-holed address, RFC 5737 TEST-NET-1): one clear
    error within seconds, not huggingface_hub's retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://192.0.2.1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    cfg = CONF / "model" / "bert_base.yaml"
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, str(cfg)], env=env, capture_output=True, text=True,
                          timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "ModelUnavailableError" and "model=minilm_l6" in out["message"]
    assert out["seconds"] < 30, out
