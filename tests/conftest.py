"""Shared fixtures: a tiny random BERT with its own WordPiece tokenizer, a RedditBias folder in the
official format (with the real files' quirks), and helpers to compose/run configs in-process or through
the real CLI. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.helpers import make_redditbias_root, make_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32, 4-head BERT + WordPiece tokenizer saved with save_pretrained (safetensors)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def redditbias_root(tmp_path_factory):
    return make_redditbias_root(tmp_path_factory.mktemp("redditbias"))


@pytest.fixture()
def sr_env(tmp_path, monkeypatch):
    """An isolated cache and working dir for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SR_CACHE_DIR", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def one_thread(monkeypatch):
    """Tiny models: on a shared 2-core box thread hand-offs cost more than the maths (10x here)."""
    import torch

    monkeypatch.setenv("SR_NUM_THREADS", "1")  # experiment.run sets its threads from it
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
