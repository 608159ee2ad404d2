"""FSCS from FairLex (Chalkidis et al., ACL 2022; Swiss-Judgment-Prediction, Niklaus et al. 2021): facts of
Swiss Federal Supreme Court cases in German, French or Italian; ``label`` dismissal (0) / approval (1);
attributes ``decision_language``, ``legal_area`` and ``court_region``. Splits = FairLex's own (by year).

Missing values: FairLex codes an unknown legal area as ``other`` and an unknown court region as ``n/a``
(``MISSING``). FairLex's own report leaves those groups out; the dataset config offers groupings without
them (the primary one) and with them (``groups_with_missing``).

Files: FairLex's release ``fscs.zip`` (train/val/test.jsonl; see ``fairlex.py`` for the record format),
downloaded once from Zenodo when no ``path`` is given, or a local folder/zip/parquet export.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from subgroup_robustness.data.sources import fairlex

NAME = "fscs"
# the vocabulary in FairLex's ClassLabel orders; conf/dataset/fscs.yaml reads it through ${sr.vocab:fscs,...}
LABELS = ("dismissal", "approval")
ATTRIBUTES = {
    "decision_language": ("de", "fr", "it"),
    "legal_area": ("other", "public_law", "penal_law", "civil_law", "social_law", "insurance_law"),
    "court_region": ("n_a", "region_lemanique", "zurich", "espace_mittelland", "northwestern_switzerland",
                     "eastern_switzerland", "central_switzerland", "ticino", "federation"),
}
# FairLex's missing-value groups, left out of the primary grouping (groupings.<name>.exclude)
MISSING = {"legal_area": ("other",), "court_region": ("n_a",)}
LANGUAGE = "decision_language"  # the attribute that says the language (per-language reporting)
URL = f"{fairlex.ZENODO}/fscs.zip"
SPEC = fairlex.Spec(
    name=NAME, labels=LABELS, attributes=ATTRIBUTES,
    release_attributes={"court_region": ("n/a", "Région lémanique", "Zürich", "Espace Mittelland",
                                         "Northwestern Switzerland", "Eastern Switzerland", "Central Switzerland",
                                         "Ticino", "Federation")},
    # not recorded yet: the release cannot be downloaded where this was written. The first download prints
    # the zip's sha256 and size; `python -m subgroup_robustness.data dataset=fscs` prints the split sizes.
    sha256=None, size=None, split_sizes=None,
)


def load(cache_dir: str | Path, path: str | Path | None = None, format: str = "auto",  # noqa: A002
         url: str = URL, hub_id: str = fairlex.HUB_ID, hub_config: str = NAME) -> pd.DataFrame:
    """The normalized table: text, label, decision_language, legal_area, court_region, split."""
    return fairlex.load_config(SPEC, cache_dir, path, format, url, hub_id, hub_config)
