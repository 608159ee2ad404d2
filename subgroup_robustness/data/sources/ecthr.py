"""ECtHR from FairLex (Chalkidis et al., ACL 2022; the ECtHR cases of Chalkidis et al., NAACL 2021): facts of
European Court of Human Rights cases (English); **multi-label**: ``labels`` = the ECHR articles found
violated, 10 of them; an empty list = no violation. Attributes ``applicant_age``, ``applicant_gender``
and ``defendant_state`` (Central-Eastern European state or the rest). Splits = FairLex's own (by year).

The table's ``label`` column holds the label set as a bitmask (bit k = ``LABELS[k]``; 0 = no violation),
and the dataset config says ``task: multilabel``: the classifier trains with BCE-with-logits on the
decoded multi-hot vector and the group metrics are micro-/macro-F1 per group (docs/datasets.md).

Missing values: FairLex codes an unknown age or gender as ``n/a`` (``MISSING``), left out of the primary
grouping as in FairLex's report; ``groups_with_missing`` keeps them.

Files: FairLex's release ``ecthr.zip`` (train/val/test.jsonl; see ``fairlex.py``), downloaded once from
Zenodo when no ``path`` is given, or a local folder/zip/parquet export.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from subgroup_robustness.data.sources import fairlex

NAME = "ecthr"
TASK = "multilabel"
# the vocabulary in FairLex's ClassLabel orders (conf/dataset/ecthr.yaml reads it through ${sr.vocab:ecthr,...});
# FairLex spells the articles "2", "3", ..., "P1-1" (matched too)
LABELS = ("article_2", "article_3", "article_5", "article_6", "article_8", "article_9", "article_10", "article_11",
          "article_14", "article_p1_1")
ATTRIBUTES = {
    "applicant_age": ("n_a", "upto_35", "upto_65", "over_65"),
    "applicant_gender": ("n_a", "male", "female"),
    "defendant_state": ("central_eastern_europe", "rest_of_europe"),
}
MISSING = {"applicant_age": ("n_a",), "applicant_gender": ("n_a",)}
URL = f"{fairlex.ZENODO}/ecthr.zip"
SPEC = fairlex.Spec(
    name=NAME, labels=LABELS, attributes=ATTRIBUTES, multi_label=True, digit_label_ids=False,
    release_labels=("2", "3", "5", "6", "8", "9", "10", "11", "14", "P1-1"),
    release_attributes={"applicant_age": ("n/a", "<=35", "<=65", ">65"),
                        "applicant_gender": ("n/a", "male", "female"),
                        "defendant_state": ("C.E. European", "Rest of Europe")},
    # not recorded yet (see fscs.py): printed by the first download and by the describe command
    sha256=None, size=None, split_sizes=None,
)


def load(cache_dir: str | Path, path: str | Path | None = None, format: str = "auto",  # noqa: A002
         url: str = URL, hub_id: str = fairlex.HUB_ID, hub_config: str = NAME) -> pd.DataFrame:
    """The normalized table: text, label (violated articles as a bitmask), the three attributes, split."""
    return fairlex.load_config(SPEC, cache_dir, path, format, url, hub_id, hub_config)
