"""Vocabulary transfer (Fast Vocabulary Transfer, Gee et al. 2022), the paper's VT100/75/50/25.

1. Train an in-domain WordPiece tokenizer on the task's training texts, with the base tokenizer's
   normalizer, pre-tokenizer and special tokens, at pct% of the base vocabulary (Python's round:
   30,522 -> 22,892 / 15,261 / 7,630, the paper's sizes).
2. FVT: a token also in the old vocabulary keeps its old embedding; a new token gets the mean of the old
   embeddings of the pieces the old WordPiece splits it into (its ``##`` prefix stripped first; by
   default the rest is split as a word of its own, as the authors' code does, or with
   ``continuation=subword`` as a word-internal piece, every old piece ``##``-prefixed).
3. One epoch of masked-LM adaptation on the training texts (15% masking), a short Lightning fit; the MLM
   head is the checkpoint's when it has one, else newly initialised (the offline MiniLM has none), tied to
   the new embeddings. Then the ordinary fine-tuning, with the new tokenizer.

Two departures from ``train_new_from_iterator``, both for honest numbers: the trainer of ``tokenizers``
numbers ``##x`` pieces in hash-map order, so the same corpus gives different vocabularies run to run;
declaring every ``##x`` up front makes it deterministic. And a corpus too small to yield the requested
size (RedditBias saturates near 15.9k tokens) is topped up with base tokens in the base's id order, so
VT100 keeps the base's size as in the paper; the report says how many tokens were learned and added.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from subgroup_robustness.compression.base import Compressor
from subgroup_robustness.compression.context import CompressionContext, Compressed
from subgroup_robustness.models.classifier import SequenceClassifier
from subgroup_robustness.utils.env import quiet_transformers
from subgroup_robustness.utils.errors import ConfigError

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"\[[^\]]+\]")  # [unused0] and the like: used last when topping up


def target_vocab_size(base_size: int, percent: float) -> int:
    """round(pct x size), Python's round (half to even): 22,892 / 15,261 / 7,630 for BERT, as the paper."""
    if not 0 < float(percent) <= 100:
        raise ConfigError(f"percent={percent}: vocabulary transfer keeps 1..100 % of the base vocabulary")
    return int(round(float(percent) / 100 * base_size))


# ---- 1. the in-domain tokenizer -------------------------------------------------------------------------
def _wordpiece_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else None
    if tj is None or tj["model"]["type"] != "WordPiece":
        kind = tj["model"]["type"] if tj else type(tokenizer).__name__
        what = "a SentencePiece/Unigram" if kind == "Unigram" else f"a {kind}"
        raise ConfigError(f"vocabulary transfer trains a WordPiece tokenizer like BERT's; this model's tokenizer is "
                          f"{what} one (XLM-R, multilingual MiniLM and e5 are). Use a WordPiece model (e.g. "
                          "model=mbert, minilm_l6, bert_base, distilbert) or another compressor.")
    return tj


def continuation_pieces(texts: Sequence[str], backend, prefix: str) -> list[str]:
    """``##x`` for every character that occurs inside a word of the corpus, sorted."""
    chars: set[str] = set()
    for text in texts:
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = backend.pre_tokenizer.pre_tokenize_str(norm) if backend.pre_tokenizer is not None else [(norm, None)]
        for word, _ in words:
            chars.update(word[1:])
    return [prefix + c for c in sorted(chars)]


def _remap_post_processor(pp: dict | None, vocab: dict[str, int]) -> dict | None:
    """The post-processor stores special-token ids ([CLS], [SEP]); point them at the new vocabulary."""
    if pp is None:
        return None
    if pp.get("type") == "Sequence":
        pp["processors"] = [_remap_post_processor(p, vocab) for p in pp["processors"]]
    for spec in (pp.get("special_tokens") or {}).values():  # TemplateProcessing
        spec["ids"] = [vocab[t] for t in spec["tokens"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing
        if key in pp:
            pp[key] = [pp[key][0], vocab[pp[key][0]]]
    return pp


def build_tokenizer(base, vocab: dict[str, int]):
    """The base tokenizer's pipeline and class with another WordPiece vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tj = _wordpiece_json(base)
    tj["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    tj["added_tokens"] = [dict(t, id=vocab[t["content"]]) for t in tj["added_tokens"] if t["content"] in vocab]
    tj["post_processor"] = _remap_post_processor(tj.get("post_processor"), vocab)
    backend = Tokenizer.from_str(json.dumps(tj))
    kwargs = base.init_kwargs.copy()
    for attr in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "bos_token", "eos_token"):
        value = getattr(base, attr, None)
        if value is not None:
            kwargs[attr] = value
    kwargs["tokenizer_object"] = backend
    try:
        tok = type(base)(**kwargs)
    except TypeError:
        tok = PreTrainedTokenizerFast(**kwargs)
    tok.model_max_length = base.model_max_length
    tok.truncation_side, tok.padding_side = base.truncation_side, base.padding_side
    return tok


def train_in_domain_tokenizer(base, texts: Sequence[str], vocab_size: int,
                              fill_from_base: bool = True) -> tuple[Any, dict[str, Any]]:
    """(new tokenizer, figures): a WordPiece vocabulary of exactly ``vocab_size`` tokens learned on
    ``texts`` (topped up from the base vocabulary if the corpus yields fewer), deterministically."""
    from tokenizers import Tokenizer, trainers

    tj = _wordpiece_json(base)
    prefix = tj["model"].get("continuing_subword_prefix") or "##"
    specials = [t["content"] for t in sorted(tj["added_tokens"], key=lambda t: t["id"]) if t.get("special")]
    cont = [c for c in continuation_pieces(texts, base.backend_tokenizer, prefix) if c not in specials]
    if len(specials) + len(cont) >= vocab_size:
        raise ConfigError(f"a vocabulary of {vocab_size} tokens cannot even hold the {len(specials)} special tokens and "
                          f"{len(cont)} word-internal characters of this corpus; use a larger percent")
    tj["model"]["vocab"], tj["added_tokens"], tj["post_processor"] = {}, [], None
    trainer_tok = Tokenizer.from_str(json.dumps(tj))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + cont,
                                        continuing_subword_prefix=prefix, show_progress=False)
    trainer_tok.train_from_iterator(list(texts), trainer)
    vocab = trainer_tok.get_vocab(with_added_tokens=True)
    learned = len(vocab)
    if fill_from_base and learned < vocab_size:
        base_tokens = [t for t, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1]) if t not in vocab]
        ordered = [t for t in base_tokens if not PLACEHOLDER.fullmatch(t)] + \
                  [t for t in base_tokens if PLACEHOLDER.fullmatch(t)]
        for token in ordered[: vocab_size - learned]:
            vocab[token] = len(vocab)
    tok = build_tokenizer(base, vocab)
    return tok, {"vocab_size_target": vocab_size, "vocab_size": len(vocab), "learned_tokens": learned,
                 "base_tokens_added": len(vocab) - learned}


# ---- 2. FVT ---------------------------------------------------------------------------------------------
def wordpiece_split(word: str, vocab: dict[str, int], prefix: str = "##", continuation: bool = False,
                    unk: str = "[UNK]", max_chars: int = 100) -> list[str]:
    """Greedy longest-match-first WordPiece (BERT's algorithm) over ``vocab``; ``continuation`` splits the
    word as if it stood inside another word (every piece prefixed)."""
    if len(word) > max_chars:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end, piece = len(word), None
        while end > start:
            sub = word[start:end]
            if start > 0 or continuation:
                sub = prefix + sub
            if sub in vocab:
                piece = sub
                break
            end -= 1
        if piece is None:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


def fvt_sources(new_tokenizer, old_tokenizer, continuation: str = "word") -> tuple[list[list[int]], dict[str, Any]]:
    """For every new token id, the old ids whose embeddings it starts from (one: the same token)."""
    if continuation not in ("word", "subword"):
        raise ConfigError(f"continuation={continuation!r}; expected 'word' (the authors' FVT) or 'subword'")
    old_vocab = old_tokenizer.get_vocab()
    tj = _wordpiece_json(old_tokenizer)
    prefix = tj["model"].get("continuing_subword_prefix") or "##"
    unk = tj["model"].get("unk_token") or old_tokenizer.unk_token
    new_vocab = new_tokenizer.get_vocab()
    sources: list[list[int]] = [[] for _ in range(len(new_vocab))]
    copied, pieces_total, unk_only = 0, 0, 0
    for token, i in new_vocab.items():
        if token in old_vocab:
            sources[i] = [old_vocab[token]]
            copied += 1
            continue
        is_cont = token.startswith(prefix) and len(token) > len(prefix)
        word = token[len(prefix):] if is_cont else token
        split = wordpiece_split(word, old_vocab, prefix, continuation=is_cont and continuation == "subword", unk=unk)
        sources[i] = [old_vocab[p] for p in split]
        pieces_total += len(split)
        unk_only += split == [unk]
    composed = len(new_vocab) - copied
    return sources, {"tokens_copied": copied, "tokens_composed": composed,
                     "mean_pieces_per_composed": pieces_total / composed if composed else 0.0,
                     "tokens_unk_only": unk_only, "continuation": continuation}


def fvt_rows(old: torch.Tensor, sources: list[list[int]]) -> torch.Tensor:
    """Row i of the result = mean of old[sources[i]] (an exact copy when there is one source)."""
    rows = torch.tensor([i for i, src in enumerate(sources) for _ in src], dtype=torch.long)
    cols = torch.tensor([j for src in sources for j in src], dtype=torch.long)
    weights = torch.tensor([1.0 / len(src) for src in sources for _ in src], dtype=old.dtype)
    picked = old[cols] * (weights.view(-1, *([1] * (old.dim() - 1))))
    out = torch.zeros((len(sources), *old.shape[1:]), dtype=old.dtype)
    return out.index_add_(0, rows, picked)


def transfer_embeddings(model: nn.Module, mlm: nn.Module | None, sources: list[list[int]], pad_id: int | None) -> None:
    """New input embeddings (and the tied MLM decoder and its bias) from the old ones, in place."""
    old_in = model.get_input_embeddings()
    new_in = nn.Embedding(len(sources), old_in.embedding_dim,
                          padding_idx=pad_id if old_in.padding_idx is not None else None)
    with torch.no_grad():
        new_in.weight.copy_(fvt_rows(old_in.weight.detach().cpu().float(), sources))
    new_in.to(old_in.weight.device, old_in.weight.dtype)
    model.set_input_embeddings(new_in)
    model.config.vocab_size = len(sources)
    if pad_id is not None:
        model.config.pad_token_id = pad_id
    if mlm is None:
        return
    out = mlm.get_output_embeddings()
    new_out = nn.Linear(old_in.embedding_dim, len(sources), bias=out.bias is not None)
    new_out.weight = new_in.weight  # tied, as in pretraining
    if out.bias is not None:
        new_out.bias = nn.Parameter(fvt_rows(out.bias.detach().cpu().float(), sources).to(out.bias))
    mlm.set_output_embeddings(new_out)
    mlm.config.vocab_size = len(sources)


def masked_lm_for(model_cfg, model: nn.Module) -> tuple[nn.Module, str]:
    """A masked-LM model sharing ``model``'s encoder (so MLM training adapts it in place), with the
    checkpoint's MLM head when it has one; (model, 'pretrained' | 'initialised')."""
    from transformers import AutoModelForMaskedLM

    from subgroup_robustness.models.loading import resolve_model_path

    path, _ = resolve_model_path(model_cfg)
    config = copy.deepcopy(model.config)
    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": False}
    if model_cfg.get("source", "hub") == "hub":
        kwargs["local_files_only"] = True  # the base was loaded a moment ago: its files are in the HF cache
    else:
        kwargs["use_safetensors"] = True
    try:
        with quiet_transformers():  # "newly initialized: cls.*" is reported in results.json instead
            mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **kwargs)
        prefix = mlm.base_model_prefix + "."
        head = "initialised" if any(not k.startswith(prefix) for k in info["missing_keys"]) else "pretrained"
    except (OSError, ValueError) as exc:
        log.warning("no masked-LM head could be read from %s (%s); initialising one", path, exc)
        mlm, head = AutoModelForMaskedLM.from_config(config), "initialised"
    setattr(mlm, mlm.base_model_prefix, getattr(model, model.base_model_prefix))
    return mlm.to(next(model.parameters()).device), head


# ---- 3. masked-LM adaptation -----------------------------------------------------------------------------
class _Texts(Dataset):
    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.ids[i]}


# the position-wise prediction heads of BertForMaskedLM (also MiniLM and multilingual-e5) and of
# (XLM-)RobertaForMaskedLM: hidden states of any shape in, vocabulary logits out
_POSITIONWISE_MLM_HEADS = ("cls", "lm_head")


def masked_lm_loss(mlm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The masked-LM loss with vocabulary logits for the masked positions only.

    transformers' ``*ForMaskedLM.forward`` scores every position against the whole vocabulary and then
    ignores all but the ~15 % masked ones (labels -100 elsewhere). The head is position-wise, so scoring
    only the masked positions gives the same loss and the same gradients (tests/compression/test_vocabulary.py
    compares both). It matters on CPU: for the MiniLM with the full 30,522-token vocabulary the head's product
    is about as large as the six-layer encoder, and an MLM step took 1.3-1.4x as long with it (measured
    2026-12-02, batch 8, bf16). Heads that are not one position-wise module run transformers' forward."""
    labels = batch["labels"]
    head = next((getattr(mlm, n) for n in _POSITIONWISE_MLM_HEADS if isinstance(getattr(mlm, n, None), nn.Module)),
                None)
    if head is None:
        return mlm(**batch).loss
    encoder = getattr(mlm, mlm.base_model_prefix)
    hidden = encoder(**{k: v for k, v in batch.items() if k != "labels"})[0]
    picked = labels != -100
    return nn.functional.cross_entropy(head(hidden[picked]), labels[picked])


class MaskedLMModule(SequenceClassifier):
    """Masked-LM adaptation with the classifier's optimizer, schedule and clipping."""

    def training_step(self, batch, batch_idx):
        loss = masked_lm_loss(self.model, batch)
        self.log("mlm/train_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("mlm/val_loss", masked_lm_loss(self.model, batch), on_step=False, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])


def _seeded_mlm_collator(tokenizer, probability: float, seed: int):
    """transformers' masking collator with its own seeded generator in any process. Its ``create_rng``
    accepts a seed only in the main process or a DataLoader worker and raises in any other child process,
    such as a joblib worker of ``hydra/launcher=local`` (every vt* job of a parallel grid failed so). Here the
    loader has no workers, so the generator is the main process's: ``seed`` itself."""
    from transformers import DataCollatorForLanguageModeling

    class SeededCollator(DataCollatorForLanguageModeling):
        def create_rng(self, return_tensors=None):
            if torch.utils.data.get_worker_info() is not None:
                return super().create_rng(return_tensors)  # a DataLoader worker: seed + worker id
            self.generator = self.get_generator(self.seed, return_tensors)
            self._generator_pid = os.getpid()

    return SeededCollator(tokenizer, mlm_probability=probability, seed=seed)


def mlm_loader(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, probability: float,
               seed: int, shuffle: bool) -> DataLoader:
    from subgroup_robustness.data.datamodule import BucketBatchSampler

    ids = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    sampler = BucketBatchSampler(np.array([len(x) for x in ids]), batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(_Texts(ids), batch_sampler=sampler, collate_fn=_seeded_mlm_collator(tokenizer, probability, seed))


def adapt_masked_lm(ctx: CompressionContext, mlm: nn.Module, tokenizer, epochs: int, batch_size: int,
                    probability: float, lr: float, weight_decay: float) -> dict[str, Any]:
    """A short Lightning fit of the masked-LM objective on the training texts (validation texts tell
    whether it helped)."""
    dm = ctx.data
    max_len, seed = int(dm.max_length), int(ctx.seed)
    train = mlm_loader(tokenizer, dm.texts("train"), batch_size, max_len, probability, seed, shuffle=True)

    def val():  # a fresh loader each time: before and after see the same masked positions
        return mlm_loader(tokenizer, dm.texts("val"), batch_size, max_len, probability, seed, shuffle=False)

    module = MaskedLMModule(mlm, lr=lr, weight_decay=weight_decay)
    callbacks = []
    if epochs > 1:  # the paper's patience; one epoch (its setting) never stops early
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor="mlm/val_loss", mode="min", patience=3))
    trainer = ctx.make_trainer(max_epochs=int(epochs), min_epochs=1, callbacks=callbacks, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    mlm.eval()
    before = trainer.validate(module, dataloaders=val(), verbose=False)
    mlm.train()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val())
    after = trainer.callback_metrics.get("mlm/val_loss")
    mlm.eval()
    return {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step), "batch_size": batch_size,
            "mlm_probability": probability, "lr": lr,
            "val_loss_before": float(before[0]["mlm/val_loss"]) if before else None,
            "val_loss_after": float(after) if after is not None else None,
            "seconds": time.perf_counter() - t0}


def tokens_per_text(tokenizer, texts: Sequence[str]) -> float:
    """How much the in-domain vocabulary shortens the sequences (the point of FVT)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return float(np.mean([len(x) for x in ids])) if ids else 0.0


def unknown_rate(tokenizer, texts: Sequence[str]) -> float:
    """Share of [UNK] tokens: characters the training texts never showed the new tokenizer."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    total = sum(len(x) for x in ids)
    return sum(x.count(tokenizer.unk_token_id) for x in ids) / total if total else 0.0


# ---- the compressor -------------------------------------------------------------------------------------
class VocabularyTransfer(Compressor):
    """FVT to an in-domain vocabulary of ``percent`` % of the base size, MLM adaptation, fine-tuning."""

    name = "vt"
    family = "vocabulary"
    stage = "before"
    start_from = "pretrained"
    trains = True

    def __init__(self, percent: float = 100, continuation: str = "word", fill_from_base: bool = True,
                 mlm_epochs: int = 1, mlm_batch_size: int = 8, mlm_probability: float = 0.15,
                 mlm_lr: float = 2e-5, mlm_weight_decay: float = 0.0, keep_tokenizer: bool = False):
        target_vocab_size(1000, percent)  # validates percent
        if keep_tokenizer and int(mlm_epochs) < 1:
            raise ConfigError("keep_tokenizer=true is the vocabulary-transfer control: it keeps the base tokenizer and "
                              "runs only the masked-LM adaptation, so it needs mlm_epochs >= 1")
        if continuation not in ("word", "subword"):
            raise ConfigError(f"continuation={continuation!r}; expected 'word' (the authors' FVT) or 'subword'")
        if not 0 < float(mlm_probability) < 1:
            raise ConfigError(f"mlm_probability={mlm_probability}: mask a fraction in (0, 1), e.g. 0.15")
        if int(mlm_epochs) < 0 or int(mlm_batch_size) < 1:
            raise ConfigError("mlm_epochs must be >= 0 and mlm_batch_size >= 1")
        self.percent = float(percent)
        self.continuation, self.fill_from_base = continuation, bool(fill_from_base)
        self.mlm_epochs, self.mlm_batch_size = int(mlm_epochs), int(mlm_batch_size)
        self.mlm_probability, self.mlm_lr, self.mlm_weight_decay = float(mlm_probability), float(mlm_lr), \
            float(mlm_weight_decay)
        self.keep_tokenizer = bool(keep_tokenizer)
        self._report: dict[str, Any] = {}

    def apply(self, ctx: CompressionContext) -> Compressed:
        if self.keep_tokenizer:
            return self._control(ctx)
        old_tok, model = ctx.tokenizer, ctx.model
        texts = ctx.data.texts("train")
        if not texts:
            raise ConfigError("vocabulary transfer learns its tokenizer from the training texts, but the train split "
                              "is empty")
        t0 = time.perf_counter()
        base_size = len(old_tok.get_vocab())
        new_tok, tok_stats = train_in_domain_tokenizer(old_tok, texts, target_vocab_size(base_size, self.percent),
                                                       self.fill_from_base)
        sources, fvt_stats = fvt_sources(new_tok, old_tok, self.continuation)
        tok_seconds = time.perf_counter() - t0
        mlm, head = (masked_lm_for(ctx.model_spec, model) if self.mlm_epochs else (None, None))
        transfer_embeddings(model, mlm, sources, new_tok.pad_token_id)
        mlm_stats: dict[str, Any] = {"epochs": 0}
        if mlm is not None:
            mlm_stats = adapt_masked_lm(ctx, mlm, new_tok, self.mlm_epochs, self.mlm_batch_size,
                                        self.mlm_probability, self.mlm_lr, self.mlm_weight_decay)
        mlm_stats["head"] = head
        model.train()
        saved = Path(ctx.workdir) / "tokenizer"
        new_tok.save_pretrained(saved)

        val_texts = ctx.data.texts("val")
        self._report = {"percent": self.percent, "vocab_size_base": base_size, **tok_stats, **fvt_stats,
                        "tokens_per_train_text": {"base": tokens_per_text(old_tok, texts),
                                                  "new": tokens_per_text(new_tok, texts)},
                        "unknown_token_rate_val": {"base": unknown_rate(old_tok, val_texts),
                                                   "new": unknown_rate(new_tok, val_texts)},
                        "tokenizer_seconds": tok_seconds, "mlm": mlm_stats, "tokenizer_dir": str(saved)}
        return Compressed(model, tokenizer=new_tok)

    def _control(self, ctx: CompressionContext) -> Compressed:
        """The matched control (``vtc``): the same masked-LM adaptation and fine-tuning with the base
        tokenizer and embeddings, so a vt row can be read against domain-adaptive MLM alone."""
        mlm, head = masked_lm_for(ctx.model_spec, ctx.model)
        stats = adapt_masked_lm(ctx, mlm, ctx.tokenizer, self.mlm_epochs, self.mlm_batch_size, self.mlm_probability,
                                self.mlm_lr, self.mlm_weight_decay)
        stats["head"] = head
        ctx.model.train()
        self._report = {"control": "base tokenizer kept; masked-LM adaptation and fine-tuning as vocabulary transfer",
                        "vocab_size": len(ctx.tokenizer.get_vocab()), "mlm": stats}
        return Compressed(ctx.model)

    def report(self, ctx: CompressionContext) -> dict[str, Any]:
        return dict(self._report)
