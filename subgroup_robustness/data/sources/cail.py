"""CAIL from FairLex (Chalkidis et al., ACL 2022; the CAIL criminal cases of Xiao et al. 2018, as Wang et
al. 2021 re-split them): facts of Chinese criminal cases; ``label`` = the imprisonment term in 6 classes
(0, <=12, <=36, <=60, <=120, >120 months); attributes ``defendant_gender`` and ``court_region`` (7
provinces). No missing values. Splits = FairLex's own.

Files: FairLex's release ``cail.zip`` (train/val/test.jsonl; see ``fairlex.py``), downloaded once from Zenodo
when no ``path`` is given (FairLex's GitHub loader points its CAIL download at ecthr.zip by mistake; the hub
loader and this one use cail.zip), or a local folder/zip/parquet export.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from subgroup_robustness.data.sources import fairlex

NAME = "cail"
# the vocabulary in FairLex's ClassLabel orders; conf/dataset/cail.yaml reads it through ${sr.vocab:cail,...}
LABELS = ("0_months", "upto_12_months", "upto_36_months", "upto_60_months", "upto_120_months", "over_120_months")
ATTRIBUTES = {
    "defendant_gender": ("male", "female"),
    "court_region": ("beijing", "liaoning", "hunan", "guangdong", "sichuan", "guangxi", "zhejiang"),
}
MISSING: dict[str, tuple[str, ...]] = {}  # CAIL has no missing-value group
URL = f"{fairlex.ZENODO}/cail.zip"
SPEC = fairlex.Spec(
    name=NAME, labels=LABELS, attributes=ATTRIBUTES,
    release_labels=("0", "<=12", "<=36", "<=60", "<=120", ">120"),
    # not recorded yet (see fscs.py): printed by the first download and by the describe command
    sha256=None, size=None, split_sizes=None,
)


def load(cache_dir: str | Path, path: str | Path | None = None, format: str = "auto",  # noqa: A002
         url: str = URL, hub_id: str = fairlex.HUB_ID, hub_config: str = NAME) -> pd.DataFrame:
    """The normalized table: text, label (term class), defendant_gender, court_region, split."""
    return fairlex.load_config(SPEC, cache_dir, path, format, url, hub_id, hub_config)
