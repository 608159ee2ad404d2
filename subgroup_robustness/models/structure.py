"""Where things are inside an encoder: the one room of architecture knowledge (TextPruner's
``BertStructure`` idea). Compressors ask here for attention blocks, the layer stack, the encoder's Linears
or the classification head, so supporting a new encoder family means extending this file only.

Supported today by duck typing: BERT-style models (BERT, MiniLM, TinyBERT, RoBERTa/XLM-R, ELECTRA,
multilingual-e5), and DistilBERT for the layer stack."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from subgroup_robustness.utils.errors import ConfigError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROJECTIONS = ("query", "key", "value")
HEAD_MODULES = ("classifier", "pre_classifier", "score")


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The keys of a batch the Hugging Face model takes (labels and group metadata stay out)."""
    if device is None:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The self-attention blocks, in layer order: modules with ``self.{query,key,value}`` and
    ``output.dense``."""
    blocks = []
    for module in model.modules():
        sa = module._modules.get("self")
        out = getattr(module._modules.get("output"), "dense", None)
        if (sa is not None and isinstance(out, nn.Linear) and hasattr(sa, "attention_head_size")
                and all(isinstance(getattr(sa, p, None), nn.Linear) for p in PROJECTIONS)):
            blocks.append(module)
    if not blocks:
        raise ConfigError(
            f"head pruning needs BERT-style attention (self.query/key/value + output.dense); "
            f"{type(model).__name__} has none. Use a BERT-family model (e.g. model=minilm_l6, bert_base)."
        )
    return blocks


def heads_per_layer(model: nn.Module) -> list[int] | None:
    heads = [int(m.num_attention_heads) for m in model.modules()
             if hasattr(m, "attention_head_size") and hasattr(m, "num_attention_heads")]
    return heads or None


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) of the transformer layers (bert.encoder.layer,
    distilbert.transformer.layer, ...): the ModuleList with num_hidden_layers entries."""
    n = int(model.config.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ConfigError(f"{type(model).__name__}: found no list of {n} transformer layers; "
                      "give the student as a model config (compressor.student_model=...)")


def encoder(model: nn.Module) -> nn.Module:
    """The transformer layers' container (no embeddings' neighbours, no pooler, no head)."""
    root = getattr(getattr(model, "base_model", model), "encoder", None)
    if root is None:
        root = getattr(getattr(model, "base_model", model), "transformer", None)
    if root is None:
        raise ConfigError(f"{type(model).__name__} has no .encoder; use scope=all")
    return root


def is_head(fqn: str) -> bool:
    """Whether a module name belongs to the classification head."""
    return fqn.split(".")[0] in HEAD_MODULES


def feed_forward_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Per layer, (parent, attr, module, attr) of the FFN's up-projection (``intermediate.dense``) and
    down-projection (``output.dense``) in BERT-style layers, in layer order."""
    out = []
    for layer in layer_stack(model)[2]:
        inter = getattr(layer, "intermediate", None)
        output = getattr(layer, "output", None)
        if not (isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(output, "dense", None), nn.Linear)):
            raise ConfigError(f"{type(model).__name__}: FFN pruning needs BERT-style layers "
                              "(intermediate.dense + output.dense); use a BERT-family model")
        out.append((inter, "dense", output, "dense"))
    return out
