"""Reading a source's local files (jsonl, CSV/TSV, zip) so that a broken one is named with its line.

The sources read files that users download by hand and files that a cut connection truncated. A
decoder's own exception is no help there: a ``UnicodeDecodeError`` carries the whole undecoded buffer
(24 KB of bytes from one binary ``.jsonl``) and names no file. Every reader here turns such a failure
into one :class:`CorruptDataError` line that gives the file, the line, what the line starts with and
what to do. A copy in the cache is deleted and fetched again; the user's own file gets "check the path".

Archives are unpacked through :mod:`subgroup_robustness.utils.io`'s atomic writers, so a killed run
never leaves a half-written member where a later run would trust it. Getting files over the network
lives next door, in :mod:`.fetch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pandas as pd

from subgroup_robustness.utils.errors import CorruptDataError
from subgroup_robustness.utils.io import atomic_copy, file_lock, sha256_file, stable_hash

REPLACE = "check the path, or replace the file with a fresh copy"
REFETCH = "delete it and run again to fetch a fresh copy"
SNIPPET_CHARS = 60


# ---- what a corrupt-file message says ------------------------------------------------------------
def fix_for(path: Path, cache_dir: Path | None) -> str:
    """A file in the source's cache was fetched (or unpacked) by us and comes back once deleted; a file
    elsewhere is the user's, and only they can replace it."""
    if cache_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            if Path(path).resolve().is_relative_to(Path(cache_dir).expanduser().resolve()):
                return REFETCH
    return REPLACE


def snippet(raw: bytes | str) -> str:
    """The start of a line, quoted: text as text, undecodable bytes as a bytes literal (never the whole buffer)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.rstrip(b"\r\n")
            return repr(raw[:SNIPPET_CHARS]) + ("…" if len(raw) > SNIPPET_CHARS else "")
    raw = raw.rstrip("\r\n")
    return repr(raw[:SNIPPET_CHARS]) + ("…" if len(raw) > SNIPPET_CHARS else "")


def corrupt(what: str, path: Path, problem: str, *, line: int | None = None, text: bytes | str | None = None,
            fix: str = REPLACE) -> CorruptDataError:
    """``<what>: <path>, line <n>: <problem> (<start of the line>); the file is corrupt or truncated — <fix>``."""
    where = f"{path}, line {line}" if line is not None else str(path)
    shown = f" ({snippet(text)})" if text is not None else ""
    return CorruptDataError(f"{what}: {where}: {problem}{shown}; the file is corrupt or truncated — {fix}.")


# ---- jsonl ----------------------------------------------------------------------------------------
def iter_jsonl(path: Path, what: str, fix: str = REPLACE) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each record. The file is read as bytes and decoded line by line, so
    an undecodable or cut line is reported with its own number; blank lines are skipped."""
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise corrupt(what, path, "not UTF-8 text", line=i, text=raw, fix=fix) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = exc.msg[:1].lower() + exc.msg[1:]  # e.g. "unterminated string starting at"
                reason += f" column {exc.colno}" if reason.endswith(" at") else f" at column {exc.colno}"
                raise corrupt(what, path, f"not valid JSON, {reason}", line=i, text=line, fix=fix) from None
            if not isinstance(obj, dict):
                raise corrupt(what, path, "not a JSON object", line=i, text=line, fix=fix)
            yield i, obj


def read_jsonl(path: Path, what: str, fix: str = REPLACE) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, what, fix)]


# ---- CSV / TSV ------------------------------------------------------------------------------------
def ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) in (b"\n", b"\r")


def _last_line(path: Path) -> tuple[int, bytes]:
    """The number and the start of a file's last line (read only when reporting a truncated file)."""
    count, last_break, offset = 0, -1, 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            if (k := block.count(b"\n")):
                count += k
                last_break = offset + block.rindex(b"\n")
            offset += len(block)
        fh.seek(last_break + 1)
        return count + 1, fh.read(4 * SNIPPET_CHARS)


def check_complete(path: Path, what: str, fix: str = REPLACE) -> None:
    """Line-oriented text files end with a line break; an empty file or a cut last line means truncation."""
    if path.stat().st_size == 0:
        raise corrupt(what, path, "the file is empty", fix=fix)
    if not ends_with_newline(path):
        line, text = _last_line(path)
        raise corrupt(what, path, "the last line has no line break", line=line, text=text, fix=fix)


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int | None, bytes | None]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                return i, raw
    return None, None


def read_csv(path: Path, what: str, fix: str = REPLACE, *, complete: bool = False, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` whose failures name the file and the line. ``complete`` first requires a
    final line break (for formats whose writers always end with one)."""
    if complete:
        check_complete(path, what, fix)
    encoding = kwargs.get("encoding") or "utf-8"
    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError:
        line, raw = _first_undecodable_line(path, encoding)
        raise corrupt(what, path, f"not {encoding} text", line=line, text=raw, fix=fix) from None
    except pd.errors.EmptyDataError:
        raise corrupt(what, path, "the file is empty", fix=fix) from None
    except pd.errors.ParserError as exc:
        reason = str(exc).strip().removeprefix("Error tokenizing data. C error: ")
        found = re.search(r"\b(?:in )?(?:line|row) (\d+)", reason)
        line = int(found.group(1)) if found else None
        reason = re.sub(r",? ?\b(?:in )?(?:line|row) \d+", "", reason).strip(" ,") if found else reason
        raise corrupt(what, path, f"cannot be parsed ({reason[:200]})", line=line, fix=fix) from None
    except ValueError as exc:  # pandas' conversions (dtype, usecols)
        raise corrupt(what, path, f"cannot be parsed ({str(exc)[:200]})", fix=fix) from None


# ---- checksums ------------------------------------------------------------------------------------
def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path, expected: str | None, what: str) -> None:
    """The published MD5 of a download (no advice: :func:`archive_advice` adds it)."""
    if expected is None:
        return
    actual = md5_file(path)
    if actual != expected:
        raise CorruptDataError(f"{what}: {path} is corrupt or truncated (md5 {actual}, expected {expected}).")


def verify_sha256(path: Path, expected: str | None, what: str, fix: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CorruptDataError(
            f"{what}: {path} is corrupt or altered (sha256 {actual[:12]}…, expected {expected[:12]}…). {fix}"
        )


# ---- archives -------------------------------------------------------------------------------------
def cache_lock(cache_dir: Path, what: str) -> Path:
    """The one lock per source cache: fetching and unpacking into it never run twice at once."""
    return Path(cache_dir) / f".{what}.lock"


def extract_members(archive: Path, wanted: Mapping[str, Path], what: str) -> None:
    """Copy zip members (matched by base name) to their targets atomically; a bad zip is named."""
    try:
        with zipfile.ZipFile(archive) as zf:
            by_name = {Path(n).name: n for n in zf.namelist() if not n.startswith("__MACOSX")}
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise CorruptDataError(f"{what}: {archive} has no member(s) {missing}; it is not the expected archive.")
            for name, dest in wanted.items():
                with zf.open(by_name[name]) as src:
                    atomic_copy(src, dest)  # zipfile checks each member's CRC at its end, before the rename
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise CorruptDataError(f"{what}: {archive} is corrupt or truncated ({exc}).") from None


@contextlib.contextmanager
def archive_advice(archive: Path, cached: bool) -> Iterator[None]:
    """Finish an archive's CorruptDataError with what to do: a cached download is removed, a user's file replaced."""
    try:
        yield
    except CorruptDataError as exc:
        if cached:
            archive.unlink(missing_ok=True)
            raise CorruptDataError(f"{exc} It was removed; run again to download it afresh.") from None
        raise CorruptDataError(f"{exc} Replace it with a fresh copy.") from None


def extract_once(archive: Path, cache_dir: Path, files: Sequence[str], what: str) -> Path:
    """A user's zip, unpacked once into the cache (the zip's own folder may be read-only); the folder."""
    folder = Path(cache_dir) / f"extracted-{stable_hash(str(Path(archive).resolve()), 10)}"

    def missing() -> dict[str, Path]:
        return {name: folder / name for name in files if not (folder / name).exists()}

    if missing():
        with file_lock(cache_lock(cache_dir, what)), archive_advice(archive, cached=False):
            if todo := missing():
                extract_members(archive, todo, what)
    return folder
