"""RedditBias cleaning, splitting and integrity checks."""

import os
from pathlib import Path

import pandas as pd
import pytest

from subgroup_robustness.data.sources import redditbias
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from tests.helpers import REDDITBIAS_FILES, make_redditbias_root


def test_cleaning_drops_the_real_files_quirks(redditbias_root):
    df = redditbias.load(cache_dir="unused", root=redditbias_root)
    # each fixture file: 60 clean rows + '2', 'biased?', blank label, blank text and a duplicate
    assert df.groupby("identity").size().tolist() == [60] * 5
    assert set(df["label"].unique()) <= {0, 1}
    assert df["text"].str.contains("caf\xe9").all()  # latin-1 decoded, not mojibake
    assert not df["text"].duplicated().any()
    assert list(df.columns) == ["text", "label", "identity", "split"]


def test_split_is_seeded_stratified_and_disjoint(redditbias_root):
    a = redditbias.load(cache_dir="unused", root=redditbias_root, split_seed=0)
    b = redditbias.load(cache_dir="unused", root=redditbias_root, split_seed=0)
    c = redditbias.load(cache_dir="unused", root=redditbias_root, split_seed=1)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    for _, part in a.groupby(["label", "identity"]):
        frac = part["split"].value_counts(normalize=True)
        assert abs(frac.get("train", 0) - 0.7) < 0.1
    assert a.groupby("text")["split"].nunique().max() == 1


def test_missing_file_is_named(tmp_path):
    root = make_redditbias_root(tmp_path / "rb", rows_per_identity=5)
    victim = root / REDDITBIAS_FILES["jewish"]
    victim.unlink()
    with pytest.raises(DataUnavailableError, match="religion1"):
        redditbias.load(cache_dir="unused", root=root)


def test_corrupt_cached_file_is_detected(tmp_path):
    """Files in the cache are checked against the recorded sha256 of the real release."""
    cache = make_redditbias_root(tmp_path / "cache", rows_per_identity=5)  # wrong bytes for every file
    with pytest.raises(CorruptDataError, match="corrupt or altered.*Delete"):
        redditbias.load(cache_dir=cache)


def test_unparseable_file_is_named(tmp_path):
    root = make_redditbias_root(tmp_path / "rb", rows_per_identity=5)
    (root / REDDITBIAS_FILES["black"]).write_text("no,columns,we,know\n1,2,3,4\n")
    with pytest.raises(CorruptDataError, match="comment"):
        redditbias.load(cache_dir="unused", root=root)


def _real_cache() -> Path | None:
    home = os.environ.get("SR_CACHE_DIR") or os.path.join(os.path.expanduser("~/.cache"), "subgroup_robustness")
    folder = Path(home) / "data" / "redditbias"
    return folder if all((folder / f).exists() for f in redditbias.FILES.values()) else None


@pytest.mark.skipif(_real_cache() is None, reason="RedditBias not fetched (make install fetches it)")
def test_real_redditbias_counts():
    """The real release, checksummed: 11,464 comments after cleaning, per-group counts as documented."""
    df = redditbias.load(cache_dir=_real_cache())
    assert len(df) == 11464
    counts = df.groupby(["identity", "label"]).size().unstack()
    assert counts.loc[redditbias.IDENTITIES.index("female")].tolist() == [943, 2032]
    assert counts.loc[redditbias.IDENTITIES.index("muslim")].tolist() == [641, 1158]
    assert int(counts.values.min()) == 641  # the smallest group: muslim / not biased
    sizes = df["split"].value_counts()
    assert sizes["train"] == 8025 and sizes["val"] == 1720 and sizes["test"] == 1719
    assert isinstance(df, pd.DataFrame)
