"""The multilingual encoders (model=xlm_roberta_base, mbert, multilingual_minilm): their configs, and what the
compressors do with XLM-R's architecture and SentencePiece tokenizer, on a tiny random XLM-R built offline
(the same classes as the hub model: XLMRobertaForSequenceClassification and a Unigram/Metaspace fast
tokenizer). Head pruning works (RoBERTa's attention has BERT's projections); vocabulary transfer refuses the
Unigram tokenizer in one line, before any training."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from subgroup_robustness.compression.pruning import head_scores, select_heads
from subgroup_robustness.compression.vocabulary import train_in_domain_tokenizer
from subgroup_robustness.models.structure import attention_blocks
from subgroup_robustness.models.surgery import load_pruned, prune_heads
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import WORDS, compose, run_in_process, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_xlmr(folder: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4,
                   seed: int = 0) -> Path:
    """A random 2-layer XLM-R and a SentencePiece-style Unigram tokenizer (Metaspace, RoBERTa's <s> a </s></s>
    b </s>), saved like the hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(WORDS, k=12)) for _ in range(300)] + ["über straße café 東京 привет мир"] * 5
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    fast = XLMRobertaTokenizer(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                               model_max_length=512)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=130,
                              num_labels=num_labels, pad_token_id=tok.token_to_id("<pad>"), bos_token_id=0,
                              eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    XLMRobertaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    return make_tiny_xlmr(tmp_path_factory.mktemp("tiny_xlmr"))


@pytest.mark.parametrize("name,hub_id,kind", [
    ("xlm_roberta_base", "FacebookAI/xlm-roberta-base", "unigram"),
    ("mbert", "google-bert/bert-base-multilingual-cased", "wordpiece"),
    ("multilingual_minilm", "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", "unigram"),
])
def test_model_configs(name, hub_id, kind):
    m = compose([f"model={name}"]).model
    assert (m.name, m.source, m.hub_id, m.tokenizer, m.tokenizer_model) == (name, "hub", hub_id, None, kind)


def test_head_pruning_on_xlm_roberta_attention(tiny_xlmr):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_xlmr).eval()
    tok = AutoTokenizer.from_pretrained(tiny_xlmr)
    assert type(model).__name__ == "XLMRobertaForSequenceClassification"
    enc = tok(["the women are good", "über 東京"], ["they know", "мир"], padding=True, return_tensors="pt")
    keep = select_heads(head_scores(model), 0.5)
    assert sum(map(len, keep)) == 4
    prune_heads(model, keep)
    assert [b.self.num_attention_heads for b in attention_blocks(model)] == [len(k) for k in keep]
    logits = model(**enc).logits
    folder = tiny_xlmr.parent / "pruned"
    model.save_pretrained(folder)
    again = load_pruned(folder)
    assert torch.allclose(again(**enc).logits, logits, atol=1e-6)


def test_a_pr40_run_on_xlm_roberta(tiny_xlmr, redditbias_root, sr_env):
    rec = run_in_process(tiny_overrides(tiny_xlmr, redditbias_root, sr_env / "run", "compressor=pr40"))
    assert rec["status"] == "completed"
    report = rec["compression"]["stages"][0]
    assert report["heads_before"] == [4, 4] and report["heads_removed"] == 3  # int(0.4 * 8), >= 1 head per layer


def test_vocabulary_transfer_refuses_a_sentencepiece_tokenizer_in_one_line(tiny_xlmr):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_xlmr)
    with pytest.raises(ConfigError) as info:
        train_in_domain_tokenizer(tok, ["the women are good"] * 20, 100)
    assert "Unigram" in str(info.value) and "\n" not in str(info.value)
