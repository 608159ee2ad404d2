"""Small file helpers. Every result file is written atomically: a killed run never leaves half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from subgroup_robustness.utils.errors import CorruptDataError


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_nan(obj: Any) -> Any:
    """JSON has no NaN; an absent group is written as null."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_nan(v) for v in obj]
    return obj


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask. Read from /proc on Linux: the portable way (set it to 0, then back) briefly
    leaves umask 0 for every other thread, which may create a world-writable file in that window."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the safe value for the moment it is set
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (0o666 & ~umask)."""
    return 0o666 & ~_umask()


def _shareable(fd: int) -> None:
    """mkstemp creates owner-only files; a result in a lab's shared folder must honour the umask like any
    ordinary file (0o666 & ~umask), so colleagues can read it."""
    os.fchmod(fd, default_file_mode())


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[Any]:
    """A binary file object whose content appears at ``path`` only when the block ends without error
    (fsync, then rename); a failed or killed writer leaves the old file, or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _shareable(fd)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_copy(src: Any, path: str | os.PathLike, chunk: int = 1 << 20) -> Path:
    """Stream a readable binary file object (a download, an archive member) to ``path`` atomically."""
    with atomic_writer(path) as fh:
        for block in iter(lambda: src.read(chunk), b""):
            fh.write(block)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(_clean_nan(obj), indent=2, default=_json_default, sort_keys=False)
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object stored at ``path``: None when there is no file; CorruptDataError (one line, naming the
    path and what is wrong) when the file is empty, truncated, garbage, not UTF-8, or valid JSON that is
    not an object (``null``, a list, a number). Other OS errors (permission, a folder) propagate as they
    are: their message already names the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.strip():
        raise CorruptDataError(f"{path}: empty file where a JSON record was expected")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptDataError(f"{path}: not UTF-8 text (byte {exc.start}); not a JSON record") from None
    except json.JSONDecodeError as exc:
        raise CorruptDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                               f"truncated or overwritten") from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{path}: holds JSON {_json_kind(obj)} where a JSON object (record) was expected")
    return obj


def _json_kind(obj: Any) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    return {list: "array", str: "string", int: "number", float: "number"}.get(type(obj), type(obj).__name__)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in folder ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (configs for W&B, identities, diffs)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    text = json.dumps(_clean_nan(obj), sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock, so parallel grid jobs never build the same cache entry twice.

    An advisory ``flock`` on ``path`` (created if missing, mode 0o666 & ~umask like any ordinary file, so a
    shared cache stays usable by colleagues). flock needs no write access: a lock file a colleague created
    without group write permission is opened read-only and locked all the same. flock is released by the
    kernel when the holder dies, so a killed job never leaves the lock held. On NFS/Lustre mounts without
    coherent flock (see ``utils.locks.check_lock_coherent``) it only excludes processes of one node."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)  # the kernel applies the umask
    except PermissionError:
        if not path.exists():
            raise
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
