"""The fine-tuned base, cached: post-training compressors of one (dataset, model, seed, training
settings) start from the same fine-tuned weights, so a grid fine-tunes each base once.

Writing. An entry is written to a temporary folder ``.<key>.tmp~<host>~<pid>~<start>~<machine>~<rand>``
(the writer's identity is in the name), its files are fsynced, their sizes and SHA-256 are recorded in the
marker ``base.json`` written last, and the folder is renamed into place. A kill at any point leaves either
the previous state or a temporary folder, never a usable-looking entry. A file lock keeps parallel jobs
from training the same base twice.

Verifying. ``load`` checks every file of the entry against the marker before loading: the list of files,
then their sizes (a stat each: catches truncation and extension at no cost), then their SHA-256 (catches
same-size corruption). Measured on a 90.9 MB entry (a MiniLM-L6-sized BERT) on this project's 2-core
machine: names and sizes 0.2 ms; SHA-256 60-100 ms (1-1.5 GB/s on a CPU with SHA extensions, expect 3-4x
more without; from disk rather than the page cache, add the read, which loading then gets for free). So
~0.3-0.5 s for BERT-base's 440 MB, against minutes of evaluation per job. ``BaseCache(root,
verify="size")`` skips the hashes. An entry that fails is reported in one logged line naming the entry,
what is wrong and that it is being rebuilt; ``get_or_train`` moves it aside, deletes it and trains it
again under the lock.

Entries written before checksums were recorded (a marker without ``_integrity``) cannot be verified; they
are rebuilt (one line says so) rather than trusted: a same-size corruption of such an entry is invisible,
and serving it would silently corrupt every row that starts from it. The rebuild costs one base fine-tune
per old entry, once.

Cleaning. Temporary and discarded folders whose writer is dead (same host, PID gone or recycled) are
removed when the cache is used; those of a live writer of this host are left alone; those of another host
(or from before writer identities were recorded) only when untouched for ``foreign_stale_after`` seconds
(6 h by default: a save takes seconds to minutes)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from subgroup_robustness.models.surgery import load_pruned
from subgroup_robustness.utils.errors import CorruptDataError
from subgroup_robustness.utils.io import (atomic_write_json, default_file_mode, file_lock, fsync_dir,
                                          read_json_record, sha256_file, stable_hash)
from subgroup_robustness.utils.locks import host_name, machine_tag, process_start, writer_state

log = logging.getLogger(__name__)

MARKER = "base.json"
INTEGRITY = "_integrity"  # the marker's checksum section (absent from entries written before checksums)
FOREIGN_STALE_AFTER = 6 * 3600.0

# .<key>.<kind>~<host>~<pid>~<proc start>~<machine tag>~<random>
_SCRATCH = re.compile(r"^\.(?P<key>.+)\.(?P<kind>tmp|trash)~(?P<host>[^~]*)~(?P<pid>\d+)~(?P<start>\d*)"
                      r"~(?P<machine>[0-9a-f]*)~[0-9a-z]+$")
_OLD_TMP = re.compile(r"^\.(?P<key>.+)\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<key>."), before writer ids


class CorruptEntryError(CorruptDataError):
    """A cache entry that fails verification or loading; ``problem`` is a phrase ("model.safetensors is
    truncated (...)") to follow the entry's path."""

    def __init__(self, entry: Path, problem: str):
        self.entry, self.problem = Path(entry), problem
        super().__init__(f"base cache entry {entry} {problem}")


class UnverifiableEntryError(CorruptEntryError):
    """An entry written before checksums were recorded."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class BaseCache:
    def __init__(self, root: str | Path, verify: str = "sha256", foreign_stale_after: float = FOREIGN_STALE_AFTER):
        if verify not in ("sha256", "size"):
            raise ValueError(f"BaseCache: verify must be 'sha256' or 'size', not {verify!r}")
        self.root = Path(root)
        self.verify_mode = verify
        self.foreign_stale_after = foreign_stale_after
        self.notes: list[str] = []  # the one-line notes of what this object repaired (for the run's record)

    def entry(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        """A marker is present (the entry is complete as written; ``verify`` says whether it is intact)."""
        return (self.entry(key) / MARKER).exists()

    # ---- verification and loading -------------------------------------------------------------------
    def verify(self, key: str) -> dict[str, Any]:
        """The entry's info (the marker less its checksums) once its files match the marker: names, then
        sizes, then (``verify="sha256"``) hashes. Raises CorruptEntryError with a one-line problem."""
        folder = self.entry(key)
        try:
            record = read_json_record(folder / MARKER)
        except CorruptDataError:
            raise CorruptEntryError(folder, f"has an unreadable marker {MARKER}") from None
        if record is None:
            raise CorruptEntryError(folder, f"has no marker {MARKER} (incomplete)")
        integrity = record.get(INTEGRITY)
        if integrity is None:
            raise UnverifiableEntryError(folder, "was written before checksums were recorded and cannot be verified")
        files = integrity.get("files") if isinstance(integrity, dict) else None
        if not isinstance(files, dict) or not files or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                and _safe_name(k) for k, v in files.items()):
            raise CorruptEntryError(folder, f"has a malformed checksum list in {MARKER}")
        present = _listing(folder)
        missing = sorted(set(files) - set(present))
        if missing:
            raise CorruptEntryError(folder, f"lacks {', '.join(missing)}")
        extra = sorted(set(present) - set(files))
        if extra:
            raise CorruptEntryError(folder, f"holds files it was not written with: {', '.join(extra[:3])}")
        for name, want in files.items():
            size = present[name]
            if size < want["size"]:
                raise CorruptEntryError(folder, f"has {name} truncated ({size:,} of {want['size']:,} bytes)")
            if size != want["size"]:
                raise CorruptEntryError(folder, f"has {name} of {size:,} bytes instead of {want['size']:,}")
        if self.verify_mode == "sha256":
            for name, want in files.items():
                if sha256_file(folder / name) != want["sha256"]:
                    raise CorruptEntryError(folder, f"has {name} altered (its SHA-256 differs from the recorded one)")
        return {k: v for k, v in record.items() if k != INTEGRITY}

    def load(self, key: str):
        """(model, tokenizer, info) of a verified entry; CorruptEntryError (one line) for anything wrong."""
        from transformers import AutoTokenizer

        info = self.verify(key)
        folder = self.entry(key)
        try:
            model = load_pruned(folder)  # from_pretrained, or the recorded head-pruned shape first
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (ImportError, MemoryError):
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CorruptEntryError(folder, f"passes its checksums but does not load ({type(exc).__name__}: "
                                            f"{first})") from exc
        return model, tokenizer, info

    # ---- writing --------------------------------------------------------------------------------------
    def save(self, key: str, model, tokenizer, info: dict[str, Any], files: dict[str, bytes] | None = None) -> Path:
        """Write an entry: the model, its tokenizer, ``files`` (e.g. the base's test predictions.npz, which
        later runs compare against) and, last, the marker with every file's checksum."""
        if INTEGRITY in info:
            raise ValueError(f"BaseCache.save: '{INTEGRITY}' is reserved for the entry's checksums")
        final = self.entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._scratch(key, "tmp")
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for name, data in (files or {}).items():
                (tmp / name).write_bytes(data)
            files, mode = {}, default_file_mode()
            for name in sorted(_listing(tmp)):
                with contextlib.suppress(OSError):  # some writers create owner-only files (safetensors: 0o600)
                    os.chmod(tmp / name, mode)
                _fsync(tmp / name)
                files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            atomic_write_json(tmp / MARKER, {**info, INTEGRITY: {  # the marker is written last
                "algorithm": "sha256", "files": files, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "writer": {"host": host_name(), "pid": os.getpid()}}})
            fsync_dir(tmp)
            for _ in range(3):
                if final.exists() or final.is_symlink():
                    self._discard(final)
                try:
                    os.rename(tmp, final)
                    break
                except OSError:  # another writer (one without the lock) put an entry there meanwhile
                    continue
            else:
                raise OSError(f"could not move the new base cache entry into {final}")
            fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def get_or_train(self, key: str, train: Callable[[], tuple[Any, Any, dict[str, Any]]]):
        """(model, tokenizer, info, reused?) — verified from the cache, or trained and stored under a lock
        (also when the entry is corrupt or unverifiable: one line says so, then it is rebuilt)."""
        self.clean_stale()
        with file_lock(self.root / f".{key}.lock"):
            if self.has(key):
                try:
                    model, tokenizer, info = self.load(key)
                    return model, tokenizer, info, True
                except CorruptEntryError as exc:
                    note = f"{exc}; moving it aside and rebuilding it (fine-tuning the base again)"
                    log.warning(note)
                    self.notes.append(note)
                    self._discard(self.entry(key))
            trained = train()  # (model, tokenizer, info) or (model, tokenizer, info, {file name: bytes})
            model, tokenizer, info = trained[:3]
            self.save(key, model, tokenizer, info, trained[3] if len(trained) > 3 else None)
            return model, tokenizer, info, False

    # ---- cleaning ---------------------------------------------------------------------------------------
    def clean_stale(self) -> list[Path]:
        """Remove temporary/discarded folders whose writer is dead (see the module docstring); the list of
        removed folders. Each removal is logged in one line."""
        removed: list[Path] = []
        try:
            children = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return removed
        for child in children:
            if not child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            path = Path(child.path)
            m = _SCRATCH.match(child.name)
            if m:
                state = writer_state(m["host"], int(m["pid"]), int(m["start"]) if m["start"] else None,
                                     m["machine"] or None)
                who = f"pid {m['pid']} on {m['host']}"
            elif _OLD_TMP.match(child.name):
                state, who = "unknown", "a writer from before writer ids were recorded"
            else:
                continue  # not ours
            if state == "alive":
                continue
            if state == "unknown":
                age = time.time() - _newest_mtime(path)
                if age < self.foreign_stale_after:
                    continue
                why = f"left by {who}, untouched for {age / 3600:.1f} h"
            else:
                why = f"left by {who}, which is dead"
            size = _tree_size(path)
            try:  # claim it first: of two cleaners, one removes and reports it
                claimed = self._scratch_name(m["key"] if m else _OLD_TMP.match(child.name)["key"], "trash")
                os.rename(path, claimed)
            except OSError:
                continue
            shutil.rmtree(claimed, ignore_errors=True)
            note = f"removed stale base cache folder {path} ({_mb(size)}, {why})"
            log.warning(note)
            self.notes.append(note)
            removed.append(path)
        return removed

    # ---- internals ----------------------------------------------------------------------------------------
    def _scratch_name(self, key: str, kind: str) -> Path:
        start = process_start(os.getpid())
        return self.root / (f".{key}.{kind}~{host_name()}~{os.getpid()}~{'' if start is None else start}"
                            f"~{machine_tag()}~{secrets.token_hex(4)}")

    def _scratch(self, key: str, kind: str) -> Path:
        while True:
            path = self._scratch_name(key, kind)
            try:
                os.mkdir(path, 0o777)  # the umask applies: a shared cache stays readable by colleagues
                return path
            except FileExistsError:
                continue

    def _discard(self, folder: Path) -> None:
        """Move an entry out of the way in one rename (so it can never be half-used), then delete it. A
        kill during the deletion leaves a trash folder of this (then dead) process, cleaned later."""
        trash = self._scratch_name(folder.name, "trash")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def _safe_name(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and name != MARKER


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the marker."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(folder).as_posix()
            if rel != MARKER:
                out[rel] = p.lstat().st_size
    return out


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    for dirpath, _, names in os.walk(folder):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(p).st_mtime)
    return newest


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def base_key(cfg) -> str:
    """Everything that changes the fine-tuned base, and nothing else (not paths, loggers, compressor)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    trainer = {k: v for k, v in c.get("trainer", {}).items()
               if k in ("max_epochs", "max_steps", "min_epochs", "precision", "gradient_clip_val",
                        "accumulate_grad_batches", "limit_train_batches", "limit_val_batches",
                        "val_check_interval", "check_val_every_n_epoch")}
    payload = {
        "dataset": c["dataset"], "model": c["model"], "seed": c["seed"], "module": c["module"],
        "data": {k: v for k, v in c["data"].items() if k not in ("dataset", "cache_dir", "num_workers")},
        "objective": c.get("objective"), "monitor": c.get("monitor"), "trainer": trainer,
        # fit_only marks when a callback runs, not what it computes: left out so existing bases stay valid
        "callbacks": {k: ({kk: vv for kk, vv in v.items() if kk != "fit_only"} if isinstance(v, dict) else v)
                      for k, v in (c.get("callbacks") or {}).items() if "progress" not in k},
    }
    name = f"{c['dataset']['name']}-{c['model']['name']}-s{c['seed']}"
    return f"{name}-{stable_hash(payload, 12)}"
