"""One live owner per job, and who is alive: a lock file that names its owner (host, PID, heartbeat), so a
second launch can tell "live elsewhere" from "left behind by a dead run" and take over only the latter.

How the lock is taken, and why
------------------------------
Ownership is the existence of one file, created with ``O_CREAT | O_EXCL``: atomic on local filesystems,
on NFSv3+ and on Lustre, i.e. exclusive across nodes where ``flock`` may not be (NFS mounted with
``nolock``/``local_lock=flock`` and Lustre with ``localflock`` keep flock node-local; Lustre with
``noflock`` refuses it). Unlike a flock, the file outlives its owner, which is what lets it *name* the
owner; the price is that a dead owner must be recognised:

* same machine (same hostname, boot and PID namespace): the recorded PID is checked, with its start time
  from /proc, so a recycled PID or a zombie counts as dead. This is exact, so a live but busy or stopped
  process (whose heartbeat may lag) keeps its lock;
* another machine: the heartbeat, rewritten every ``heartbeat`` seconds by a daemon thread. A lock whose
  heartbeat is older than ``stale_after`` seconds is taken over. Clocks of the nodes are compared, so
  ``stale_after`` must exceed the heartbeat interval plus any clock skew (the default 120 s against a 30 s
  heartbeat tolerates three missed beats).

The owner also holds a ``flock`` on its lock file. It is used only as *positive* evidence: if another
descriptor cannot take a shared flock, the owner is alive, whatever its heartbeat says (this covers PID
namespaces on one host). A flock that can be taken proves nothing, since it may be node-local.

Takeover renames the dead owner's file aside and checks it moved the inode it judged dead, so two
processes taking over at once cannot remove each other's fresh lock. An owner checks at every heartbeat
that the file is still its own inode; if not (it was judged dead, e.g. after being suspended for longer
than ``stale_after``) it logs one line and reports ``lost``.

``check_lock_coherent(folder)`` tests, at start-up, what the filesystem of a folder offers.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subgroup_robustness.utils.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "owner.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
_RECORD_BYTES = 1024  # heartbeats rewrite the record in place, padded to one size


# ---- who is alive ------------------------------------------------------------------------------------
def host_name() -> str:
    """This machine's hostname, restricted to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9.\-]", "_", socket.gethostname() or "unknown-host")


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def machine_tag() -> str:
    """8 hex digits naming this boot of this machine's PID namespace: two processes with the same tag (and
    hostname) see each other's PIDs. Containers sharing a hostname but not a PID namespace differ here."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or ""
    return hashlib.sha256(f"{boot}|{_pid_namespace() or ''}".encode()).hexdigest()[:8]


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])  # state, starttime
    except (IndexError, ValueError):
        return None


def _exists(pid: int) -> bool:
    """Signal 0: no such process -> False; EPERM means it exists but belongs to another user -> True."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this machine is alive and, when ``start`` is given, is the same process
    (not a recycled PID). A zombie (killed, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    if not _exists(pid):
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc/self/stat").exists() or Path(f"/proc/{pid}").exists()
    state, started = stat
    if state in ("Z", "X", "x"):
        return False
    return start is None or started == start


def this_process() -> dict[str, Any]:
    return {"host": host_name(), "pid": os.getpid(), "machine": machine_tag(), "proc_start": process_start(os.getpid())}


def writer_state(host: str, pid: int, proc_start: int | None = None, machine: str | None = None) -> str:
    """"alive" / "dead" for a process of this machine (same hostname and, when recorded, same machine tag);
    "unknown" for one of another machine, whose liveness cannot be observed from here."""
    if host != host_name() or (machine is not None and machine != machine_tag()):
        return "unknown"
    return "alive" if pid_alive(pid, proc_start) else "dead"


# ---- the per-job owner lock ---------------------------------------------------------------------------
class JobLockBusy(UserError):
    """The job is owned by another live process."""


@dataclass
class LockState:
    """What the lock file of a folder says: ``record`` (None when absent or unreadable), whether its owner
    is ``alive``, and ``reason``, a phrase saying why."""
    exists: bool
    alive: bool
    reason: str
    record: dict[str, Any] | None = None
    inode: tuple[int, int] | None = None

    def describe(self) -> str:
        return describe_owner(self.record, self.reason)


def describe_owner(record: dict[str, Any] | None, reason: str = "") -> str:
    """One phrase for a lock record: "pid 4242 on node17, started 2026-01-01T10:00:00, heartbeat 12 s ago"."""
    if not record:
        return reason or "an unknown owner"
    parts = [f"pid {record.get('pid')} on {record.get('host')}"]
    if record.get("started"):
        parts.append(f"started {record['started']}")
    beat = record.get("heartbeat")
    if isinstance(beat, (int, float)):
        parts.append(f"heartbeat {max(0.0, time.time() - beat):.0f} s ago")
    text = ", ".join(parts)
    return f"{text} ({reason})" if reason else text


@dataclass(eq=False)
class JobLock:
    """``JobLock(folder)``: at most one live owner of ``folder`` (a job's output folder).

    ``acquire()`` is True when this process now owns it, False when another live process does (then
    ``holder`` is its record and ``holder_text`` a phrase naming it). A lock left by a dead owner is taken
    over with one logged line (``note``; the old record in ``took_over``). ``release()`` removes the file
    only if it is still ours. As a context manager it raises ``JobLockBusy`` when the job is live elsewhere.
    """

    folder: str | os.PathLike
    name: str = LOCK_NAME
    stale_after: float = STALE_AFTER_S
    heartbeat: float = HEARTBEAT_S
    holder: dict[str, Any] | None = field(default=None, init=False)
    holder_text: str | None = field(default=None, init=False)
    took_over: dict[str, Any] | None = field(default=None, init=False)
    note: str | None = field(default=None, init=False)
    lost: bool = field(default=False, init=False)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.path = self.folder / self.name
        if not self.stale_after > self.heartbeat > 0:
            raise ValueError(f"JobLock: need stale_after ({self.stale_after}) > heartbeat ({self.heartbeat}) > 0")
        self._fd: int | None = None
        self._pid = os.getpid()  # a forked child inherits the object, not the ownership
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # -- public ---------------------------------------------------------------------------------------
    def acquire(self, wait: float = 0.0, poll: float = 2.0) -> bool:
        """Own the job now (True), or report its live owner (False), after waiting up to ``wait`` seconds
        for it to finish."""
        if self._fd is not None:
            return True
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            for _ in range(20):  # a lock may vanish or be replaced between two looks: look again
                if self._create():
                    self.holder = self.holder_text = None
                    return True
                state = self.state()
                if not state.exists:
                    continue
                if state.alive:
                    break
                self._take_over(state)
            else:
                state = self.state()
            self.holder, self.holder_text = state.record, state.describe()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll, left))

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours (never another owner's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        _HELD.discard(self)
        with self._mutex:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if os.getpid() == self._pid and self._is_ours(fd):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
            finally:
                os.close(fd)

    def held(self) -> bool:
        """Whether the lock file is still the one this object created."""
        with self._mutex:
            return self._fd is not None and self._is_ours(self._fd)

    def state(self) -> LockState:
        """What the lock file says now, and whether its owner is alive."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return LockState(False, False, "no lock")
        try:
            st = os.fstat(fd)
            record = _parse(fd)
            inode = (st.st_dev, st.st_ino)
            if _flock_held_elsewhere(fd):
                return LockState(True, True, "holds the lock file's flock", record, inode)
        finally:
            os.close(fd)
        if record is None:
            age = time.time() - st.st_mtime
            if age > self.stale_after:
                return LockState(True, False, f"unreadable lock file, untouched for {age:.0f} s", None, inode)
            return LockState(True, True, "lock file being written", None, inode)
        try:
            host, pid = str(record["host"]), int(record["pid"])
        except (KeyError, TypeError, ValueError):
            host, pid = "", -1
        where = writer_state(host, pid, record.get("proc_start"), record.get("machine"))
        if where == "alive":
            return LockState(True, True, "alive on this host", record, inode)
        if where == "dead":
            return LockState(True, False, "its process is gone", record, inode)
        beat = record.get("heartbeat")
        age = time.time() - beat if isinstance(beat, (int, float)) else time.time() - st.st_mtime
        if age > self.stale_after:
            return LockState(True, False, f"no heartbeat for {age:.0f} s", record, inode)
        return LockState(True, True, f"heartbeat {max(age, 0.0):.0f} s ago", record, inode)

    def __enter__(self) -> "JobLock":
        if not self.acquire():
            raise JobLockBusy(f"{self.folder} is being run by another live process: {self.holder_text}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------------------
    def _create(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)  # the umask applies, as to any file
        except FileExistsError:
            return False
        try:
            with contextlib.suppress(OSError):  # positive liveness evidence only; see the module docstring
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = time.time()
            self._record = dict(this_process(), started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                                heartbeat=round(now, 3), token=secrets.token_hex(8))
            _write_record(fd, self._record)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(self)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"joblock-heartbeat:{self.folder.name}", daemon=True)
        self._thread.start()
        return True

    def _take_over(self, state: LockState) -> None:
        """Remove the dead owner's lock file, but only the very inode judged dead."""
        grave = self.folder / f".{self.name}.stale~{host_name()}~{os.getpid()}~{secrets.token_hex(4)}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # someone else removed it first
        try:
            st = os.stat(grave)
            if state.inode is not None and (st.st_dev, st.st_ino) != state.inode:
                # replaced by a fresh lock since we looked: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(grave, self.path)
                return
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(grave)
        self.took_over = state.record
        self.note = (f"taking over {self.folder}: its previous owner ({describe_owner(state.record)}) is dead: "
                     f"{state.reason}")
        log.warning(self.note)

    def _is_ours(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _beat(self) -> None:
        stop = self._stop
        while not stop.wait(self.heartbeat):
            with self._mutex:
                if self._fd is None:
                    return
                if not self._is_ours(self._fd):
                    self.lost = True
                    log.warning("%s: this process (pid %d) no longer owns the job: another process took it over",
                                self.folder, os.getpid())
                    return
                self._record["heartbeat"] = round(time.time(), 3)
                with contextlib.suppress(OSError):
                    _write_record(self._fd, self._record)


_HELD: "weakref.WeakSet[JobLock]" = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    """A process that ends normally (Ctrl-C included) without releasing leaves no lock behind."""
    for lock in list(_HELD):
        with contextlib.suppress(Exception):
            lock.release()


def _write_record(fd: int, record: dict[str, Any]) -> None:
    """In place, one write of a fixed size: a reader sees the old or the new record, and after a takeover
    a late heartbeat lands in the old (unlinked) inode, never in the new owner's file."""
    data = json.dumps(record, sort_keys=True).encode("utf-8")
    if len(data) < _RECORD_BYTES:
        data = data + b" " * (_RECORD_BYTES - 1 - len(data)) + b"\n"
    os.pwrite(fd, data, 0)
    if len(data) > _RECORD_BYTES:
        os.ftruncate(fd, len(data))


def _parse(fd: int) -> dict[str, Any] | None:
    for attempt in range(3):
        try:
            data = os.pread(fd, 1 << 16, 0)
            obj = json.loads(data.decode("utf-8"))
            if isinstance(obj, dict):
                return obj
        except (OSError, ValueError):
            pass
        if attempt < 2:
            time.sleep(0.02)
    return None


def _flock_held_elsewhere(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # flock unsupported here: no evidence either way
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    return False


# ---- what the filesystem offers -----------------------------------------------------------------------
@dataclass
class LockCheck:
    """``exclusive_create``: O_EXCL refuses a second create (JobLock relies on it). ``flock``: "exclusive",
    "not-exclusive" (a no-op flock) or "unsupported (...)", as tested in this process. ``cross_node``:
    whether flock excludes processes of *other* nodes: True (coherent network filesystem), False (node-
    local), None (unknown), "local" (a local filesystem, one node anyway). ``ok``: job locks are sound."""
    folder: str
    fstype: str
    options: str
    exclusive_create: bool
    flock: str
    cross_node: Any
    ok: bool
    message: str


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, fstype, mount + superblock options) of the mount holding ``path``, from mountinfo."""
    best = ("/", "unknown", "")
    text = _read_text("/proc/self/mountinfo") or ""
    real = os.path.realpath(path)
    for line in text.splitlines():
        try:
            pre, post = line.split(" - ", 1)
            fields, after = pre.split(), post.split()
            point = fields[4].replace("\\040", " ")
            fstype, super_opts = after[0], (after[2] if len(after) > 2 else "")
        except (ValueError, IndexError):
            continue
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fstype, f"{fields[5]},{super_opts}")
    return best


LOCAL_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "overlay", "apfs", "jfs", "reiserfs"}


def _cross_node(fstype: str, options: str) -> Any:
    opts = set(options.split(","))
    if fstype in LOCAL_FS:
        return "local"
    if fstype.startswith("nfs"):
        return not ({"nolock", "local_lock=flock", "local_lock=all"} & opts)
    if fstype == "lustre":
        if "localflock" in opts or "noflock" in opts:
            return False
        return True if "flock" in opts else None
    if fstype in ("gpfs", "beegfs", "cephfs", "ceph"):
        return True
    return None


def check_lock_coherent(folder: str | os.PathLike) -> LockCheck:
    """Test at start-up what locking the filesystem of ``folder`` offers (creates and removes two probe
    files there).

    In one process, flock's *local* exclusion can be tested: flock locks belong to the open file
    description, so two separate ``open()`` calls of one file conflict, and a second ``LOCK_NB`` request
    must fail. This catches a flock that is refused (Lustre ``noflock``, NFS without lockd: ENOLCK) or a
    silent no-op (some FUSE filesystems). Whether flock excludes processes on *other nodes* cannot be tested
    from one process or one node; that is read from the mount's type and options (NFS ``nolock`` /
    ``local_lock=flock``, Lustre ``localflock`` are node-local) and reported as ``cross_node``. JobLock does
    not depend on it (it uses O_EXCL and heartbeats); ``utils.io.file_lock`` does, and on a node-local
    filesystem only keeps jobs of one node from building the same cache entry twice."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{host_name()}~{os.getpid()}~{secrets.token_hex(4)}"
    probe = folder / f".lockcheck~{tag}"
    exclusive = False
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            exclusive = True
        a, b = os.open(probe, os.O_RDWR), os.open(probe, os.O_RDWR)
        try:
            try:
                fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                flock = f"unsupported ({errno.errorcode.get(exc.errno, exc.errno)})"
            else:
                try:
                    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flock = "not-exclusive"
                except BlockingIOError:
                    flock = "exclusive"
                except OSError as exc:
                    flock = f"unsupported ({errno.errorcode.get(exc.errno, exc.errno)})"
        finally:
            os.close(a)
            os.close(b)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    _, fstype, options = _mount_of(folder)
    cross = _cross_node(fstype, options) if flock == "exclusive" else False
    if not exclusive:
        msg = f"{folder} ({fstype}): O_EXCL create is not exclusive here; job locks cannot work: use another folder"
    elif flock != "exclusive":
        msg = (f"{folder} ({fstype}): flock is {flock}; job locks rely on their heartbeat, and cache builds are "
               f"not serialised")
    elif cross is False:
        msg = (f"{folder} ({fstype}): flock is node-local; job locks rely on their heartbeat across nodes, and "
               f"cache builds are serialised per node only")
    elif cross is None:
        msg = f"{folder} ({fstype}): flock works here; whether it excludes other nodes is unknown"
    else:
        msg = f"{folder} ({fstype}): locking works" + (" across nodes" if cross is True else "")
    return LockCheck(str(folder), fstype, options, exclusive, flock, cross, exclusive, msg)
