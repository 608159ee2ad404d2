"""Fast Vocabulary Transfer: exact vocabulary sizes, the FVT initialisation rule, the MLM head and the
masked-LM adaptation, and an end-to-end vt50 run on a tiny BERT."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from subgroup_robustness.compression.context import Compressed, SimpleContext
from subgroup_robustness.compression.vocabulary import (
    VocabularyTransfer, build_tokenizer, fvt_rows, fvt_sources, masked_lm_for, masked_lm_loss, mlm_loader,
    target_vocab_size, train_in_domain_tokenizer, transfer_embeddings, wordpiece_split)
from subgroup_robustness.utils.errors import ConfigError
from tests.helpers import WORDS, compose, run_in_process, tiny_overrides


pytestmark = pytest.mark.usefixtures("one_thread")

# in-domain words the tiny base vocabulary has never seen as wholes: FVT must compose them from pieces
NEW_WORDS = ["lazypeople", "goodguys", "smartgirls", "neverkind", "hatelove", "allthink", "somestupid"]


def corpus(n: int = 200, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS + NEW_WORDS * 3, k=10)) for _ in range(n)]


def load(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_target_sizes_are_the_papers():
    assert [target_vocab_size(30522, p) for p in (100, 75, 50, 25)] == [30522, 22892, 15261, 7630]
    for bad in (0, -5, 101):
        with pytest.raises(ConfigError, match="percent"):
            target_vocab_size(30522, bad)


def test_in_domain_tokenizer_has_exact_size_and_is_deterministic(tiny_model_dir):
    _, base = load(tiny_model_dir)
    texts = corpus()
    a, stats = train_in_domain_tokenizer(base, texts, 120)
    b, _ = train_in_domain_tokenizer(base, texts, 120)
    assert len(a) == len(a.get_vocab()) == 120 == stats["vocab_size"]
    # tokenizers' own trainer numbers ##x pieces in hash order and differs run to run; ours may not
    assert a.get_vocab() == b.get_vocab()
    assert stats["learned_tokens"] == 120 and stats["base_tokens_added"] == 0
    assert "lazypeople" in a.get_vocab()  # an in-domain word became one token
    enc = a("lazypeople are good")
    assert enc["input_ids"][0] == a.cls_token_id and enc["input_ids"][-1] == a.sep_token_id  # post-processor remapped
    assert a.convert_ids_to_tokens(enc["input_ids"])[1] == "lazypeople"
    assert [a.pad_token, a.unk_token, a.mask_token] == [base.pad_token, base.unk_token, base.mask_token]


def test_small_corpus_is_topped_up_from_the_base_vocabulary(tiny_model_dir):
    _, base = load(tiny_model_dir)
    texts = ["the women are good", "the men are bad"] * 5
    full, stats = train_in_domain_tokenizer(base, texts, len(base))
    assert len(full) == len(base) and stats["learned_tokens"] < len(base)
    assert stats["base_tokens_added"] == len(base) - stats["learned_tokens"]
    added = sorted(full.get_vocab().items(), key=lambda kv: kv[1])[stats["learned_tokens"]:]
    base_vocab = base.get_vocab()
    assert all(t in base_vocab for t, _ in added)
    assert [base_vocab[t] for t, _ in added] == sorted(base_vocab[t] for t, _ in added)  # in the base's order
    bare, bare_stats = train_in_domain_tokenizer(base, texts, len(base), fill_from_base=False)
    assert len(bare) == bare_stats["learned_tokens"] == stats["learned_tokens"]


def test_only_wordpiece_tokenizers_are_transferred():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "[UNK]": 1}, merges=[],
                                                                        unk_token="[UNK]")), unk_token="[UNK]")
    with pytest.raises(ConfigError, match="WordPiece"):
        train_in_domain_tokenizer(bpe, ["a a"], 2)


def test_wordpiece_split_matches_the_library_and_splits_continuations_as_pieces():
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "##be", "##lie", "##vable", "be", "lie", "##li", "##e",
                                         "vable", "##un", "##b"])}
    lib = WordPiece(vocab=vocab, unk_token="[UNK]")
    for word in ("unbelievable", "believable", "lie", "unbe", "xyz", "vable"):
        assert wordpiece_split(word, vocab) == [t.value for t in lib.tokenize(word)]
    # the same string inside a word: every piece is a ##piece
    assert wordpiece_split("unbelie", vocab, continuation=True) == ["##un", "##be", "##lie"]
    assert wordpiece_split("zz", vocab, continuation=True) == ["[UNK]"]


def test_fvt_copies_shared_tokens_exactly_and_averages_new_ones(tiny_model_dir):
    model, base = load(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    new_tok, _ = train_in_domain_tokenizer(base, corpus(), 120)
    sources, stats = fvt_sources(new_tok, base)
    transfer_embeddings(model, None, sources, new_tok.pad_token_id)
    new = model.get_input_embeddings().weight.detach()
    assert new.shape == (120, old.shape[1]) and model.config.vocab_size == 120
    assert model.get_input_embeddings().padding_idx == new_tok.pad_token_id

    old_vocab, new_vocab = base.get_vocab(), new_tok.get_vocab()
    shared = [t for t in new_vocab if t in old_vocab]
    composed = [t for t in new_vocab if t not in old_vocab]
    assert shared and composed and stats["tokens_copied"] == len(shared)
    for t in shared:
        assert torch.equal(new[new_vocab[t]], old[old_vocab[t]]), t
    wp = base.backend_tokenizer.model  # the old tokenizer itself is the oracle
    for t in composed:
        pieces = [p.id for p in wp.tokenize(t[2:] if t.startswith("##") else t)]
        torch.testing.assert_close(new[new_vocab[t]], old[pieces].mean(0), rtol=0, atol=1e-6)
    assert any(t.startswith("##") for t in composed) and any(len(wp.tokenize(t)) > 1 for t in composed)


def test_fvt_subword_mode_starts_continuations_from_continuation_pieces(tiny_model_dir):
    _, base = load(tiny_model_dir)
    new_tok, _ = train_in_domain_tokenizer(base, corpus(), 120)
    word_src, _ = fvt_sources(new_tok, base, "word")
    sub_src, stats = fvt_sources(new_tok, base, "subword")
    old_ids = base.get_vocab()
    conts = [t for t in new_tok.get_vocab() if t.startswith("##") and t not in old_ids]
    assert conts and stats["continuation"] == "subword"
    for t in conts:
        pieces = base.convert_ids_to_tokens(sub_src[new_tok.get_vocab()[t]])
        assert all(p.startswith("##") for p in pieces) or pieces == [base.unk_token], (t, pieces)
    assert word_src != sub_src


def test_fvt_rows_copy_and_mean():
    old = torch.arange(12, dtype=torch.float32).view(4, 3)
    out = fvt_rows(old, [[2], [0, 1], [3, 3, 1]])
    assert torch.equal(out[0], old[2])
    torch.testing.assert_close(out[1], old[[0, 1]].mean(0))
    torch.testing.assert_close(out[2], old[[3, 3, 1]].mean(0))


def test_mlm_head_reused_when_the_checkpoint_has_one_and_tied_to_new_embeddings(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    from subgroup_robustness.models.loading import load_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref, _ = load(tiny_model_dir)
    torch.manual_seed(0)
    mlm_ckpt = BertForMaskedLM(ref.config)  # like bert-base-uncased: weights with an MLM head
    with torch.no_grad():
        mlm_ckpt.cls.predictions.bias.normal_()
    mlm_ckpt.save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    spec = {"name": "x", "source": "local", "path": str(tmp_path / "mlm")}
    model, base = load_model(spec, 2)
    mlm, head = masked_lm_for(spec, model)
    assert head == "pretrained" and mlm.bert is model.bert  # MLM training adapts the classifier's encoder
    old_bias = mlm_ckpt.cls.predictions.bias.detach().clone()
    new_tok, _ = train_in_domain_tokenizer(base, corpus(), 120)
    sources, _ = fvt_sources(new_tok, base)
    transfer_embeddings(model, mlm, sources, new_tok.pad_token_id)
    out = mlm.get_output_embeddings()
    assert out.weight is model.get_input_embeddings().weight and mlm.cls.predictions.bias is out.bias
    assert out.bias.shape == (120,) and mlm.config.vocab_size == 120
    old_vocab = base.get_vocab()
    for t, i in new_tok.get_vocab().items():
        if t in old_vocab:
            assert out.bias[i] == old_bias[old_vocab[t]]
    ids = torch.tensor([new_tok("lazypeople are good")["input_ids"]])
    assert mlm(input_ids=ids, labels=ids).logits.shape == (1, ids.shape[1], 120)

    # the offline MiniLM has no MLM head: one is initialised, and the report says so
    plain, _ = load(tiny_model_dir)
    _, head = masked_lm_for({"name": "tiny", "source": "local", "path": str(tiny_model_dir)}, plain)
    assert head == "initialised"


def vt_apply(cfg, dm, folder, out):
    import lightning.pytorch as pl

    pl.seed_everything(1, verbose=False)  # as the runner does before the stages
    model, tok = load(folder)
    # only what a CompressionContext declares: the data module's read-only views, a work folder, the seed,
    # the model spec and a trainer factory
    ctx = SimpleContext(model=model, tokenizer=tok, data=dm, workdir=out, seed=int(cfg.seed),
                        model_spec=OmegaConf.to_container(cfg.model, resolve=True),
                        label_names=list(cfg.dataset.label_names))
    stage = instantiate(cfg.compressor.stages[0])
    encoder = {k: v.clone() for k, v in model.bert.encoder.state_dict().items()}
    result = stage.apply(ctx)
    assert isinstance(result, Compressed) and result.model is model and result.teacher is None
    assert result.tokenizer is not None and result.tokenizer is not tok and ctx.tokenizer is tok  # the run swaps it
    ctx.update(result)
    return ctx, stage, encoder


def test_vt_apply_adapts_the_encoder_with_mlm_and_swaps_the_tokenizer(tiny_model_dir, redditbias_root, sr_env):
    cfg = compose(tiny_overrides(tiny_model_dir, redditbias_root, sr_env / "run", "compressor=vt50"))
    dm = instantiate(cfg.data, _recursive_=False)
    dm.load_table()
    ctx, stage, encoder = vt_apply(cfg, dm, tiny_model_dir, sr_env / "run")
    model, tok = ctx.model, load(tiny_model_dir)[1]
    assert isinstance(stage, VocabularyTransfer) and stage.mlm_probability == 0.15 and stage.mlm_batch_size == 8
    rep = stage.report(ctx)
    target = target_vocab_size(len(tok), 50)
    assert len(ctx.tokenizer) == rep["vocab_size"] == target == model.config.vocab_size
    assert model.get_input_embeddings().num_embeddings == target
    assert rep["mlm"]["head"] == "initialised" and rep["mlm"]["epochs"] == 1
    n_train = len(dm.texts("train"))
    assert rep["mlm"]["steps"] == -(-n_train // 8)  # one epoch at batch 8
    assert rep["mlm"]["val_loss_before"] > 0 and rep["mlm"]["val_loss_after"] > 0
    assert any(not torch.equal(encoder[k], v) for k, v in model.bert.encoder.state_dict().items())
    saved = Path(rep["tokenizer_dir"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(saved).get_vocab() == ctx.tokenizer.get_vocab()
    ids = torch.tensor([ctx.tokenizer(dm.texts("test")[0])["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, 2)
    again, _, _ = vt_apply(cfg, dm, tiny_model_dir, sr_env / "again")  # same seed, same adapted weights
    for (k, v), w in zip(model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_mlm_adaptation_truncates_at_the_datasets_max_length(tiny_model_dir, redditbias_root, sr_env, monkeypatch):
    """The masked-LM texts are cut where the classifier's are (``dataset.max_length``), not at a default."""
    from subgroup_robustness.compression import vocabulary

    cfg = compose(tiny_overrides(tiny_model_dir, redditbias_root, sr_env / "run", "compressor=vt50",
                                 "dataset.max_length=40"))
    dm = instantiate(cfg.data, _recursive_=False)
    dm.load_table()
    seen = []

    class Stop(Exception):
        pass

    def spy(tokenizer, texts, batch_size, max_length, *args, **kwargs):
        seen.append(max_length)
        raise Stop

    monkeypatch.setattr(vocabulary, "mlm_loader", spy)
    with pytest.raises(Stop):
        vt_apply(cfg, dm, tiny_model_dir, sr_env / "run")
    assert seen == [40]


def test_build_tokenizer_round_trips_the_base(tiny_model_dir):
    _, base = load(tiny_model_dir)
    same = build_tokenizer(base, base.get_vocab())
    text = "the women are never lazy caf\xe9"
    assert same(text)["input_ids"] == base(text)["input_ids"]


def test_vt50_end_to_end(tiny_model_dir, redditbias_root, sr_env):
    rec = run_in_process(tiny_overrides(tiny_model_dir, redditbias_root, sr_env / "vt", "compressor=vt50"))
    assert rec["status"] == "completed"
    stage = rec["compression"]["stages"][0]
    base_vocab = rec["base"]["figures"]["vocab_size"]
    assert stage["name"] == "vt" and stage["vocab_size_base"] == base_vocab
    assert stage["vocab_size"] == rec["model"]["vocab_size"] == target_vocab_size(base_vocab, 50)
    assert rec["model"]["params"] < rec["base"]["figures"]["params"]
    assert rec["model"]["layers"] == rec["base"]["figures"]["layers"]
    assert stage["mlm"]["head"] == "initialised" and stage["mlm"]["steps"] > 0
    assert (sr_env / "vt" / "tokenizer" / "tokenizer.json").exists()
    latency = stage["cpu_latency_ms_per_example"]  # measured by the run around every stage
    assert latency["before"] > 0 and latency["after"] > 0
    assert 0.0 <= rec["metrics"]["test"]["test/acc_wg"] <= rec["metrics"]["test"]["test/acc_avg"] <= 1.0


def test_mlm_masks_are_seeded_alike_in_a_grid_worker_process(tiny_model_dir, monkeypatch):
    """A joblib (loky) worker of hydra/launcher=local is neither the main process nor a DataLoader worker:
    transformers' seeded collator raised there and failed every vt* job of a parallel grid. The masks must
    be the main process's, for the same seed."""
    import multiprocessing

    from subgroup_robustness.compression.vocabulary import mlm_loader

    _, tok = load(tiny_model_dir)

    def masks():
        loader = mlm_loader(tok, corpus(64), batch_size=16, max_length=32, probability=0.15, seed=3, shuffle=True)
        return [(b["input_ids"].clone(), b["labels"].clone()) for b in loader]

    here = masks()
    monkeypatch.setattr(multiprocessing.current_process(), "name", "LokyProcess-1")
    assert multiprocessing.current_process().name != "MainProcess"
    there = masks()
    assert len(here) == len(there) == 4
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(here, there))
    assert any((b != -100).any() for _, b in there)  # something was masked


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("bf16", [False, True])
def test_masked_lm_loss_scoring_only_masked_positions_equals_transformers(tiny_model_dir, arch, bf16):
    """The MLM loss from the masked positions' logits is transformers' loss, with the same gradients, for the
    position-wise heads (BERT's cls, RoBERTa's lm_head) and through transformers' own forward otherwise."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    _, tok = load(tiny_model_dir)
    kw = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=80)
    if arch == "distilbert":
        kw = dict(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=80)
    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(AutoConfig.for_model(arch, **kw)).train()
    batch = next(iter(mlm_loader(tok, corpus(32), batch_size=16, max_length=32, probability=0.15, seed=1,
                                 shuffle=True)))
    if arch != "bert":
        batch.pop("token_type_ids", None)
    assert 0 < int((batch["labels"] != -100).sum()) < batch["labels"].numel() // 3  # a few positions masked

    def loss_and_grads(fn):
        mlm.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks: the model trains (dropout on), as in the adaptation
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in mlm.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(lambda: mlm(**batch).loss)
    loss, grads = loss_and_grads(lambda: masked_lm_loss(mlm, batch))
    # bf16: about one bf16 rounding step (kernels differ with the number of rows); a 1 % error in the head input fails
    tol = dict(rtol=5e-3, atol=5e-4) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert ref_grads.keys() == grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")
