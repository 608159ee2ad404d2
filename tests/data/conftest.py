"""Tiny random BERTs whose heads match each dataset's label count (3 for MultiNLI, 11 for SCOTUS)."""

from __future__ import annotations

import pytest

from tests.helpers import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert_factory(tmp_path_factory):
    made = {}

    def get(num_labels: int):
        if num_labels not in made:
            made[num_labels] = make_tiny_bert(tmp_path_factory.mktemp(f"tiny_bert_{num_labels}"), num_labels=num_labels)
        return made[num_labels]

    return get
