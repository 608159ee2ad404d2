"""One live owner per job (issue #17): a second process is refused while the owner lives and takes over
once it is dead (SIGKILL, zombie, recycled PID, or a heartbeat gone stale on another host)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest

from subgroup_robustness.utils import locks
from subgroup_robustness.utils.locks import (LOCK_NAME, JobLock, JobLockBusy, check_lock_coherent, host_name,
                                             machine_tag, process_start)

FORK = multiprocessing.get_context("fork")


def _own(folder: str, ready, heartbeat: float = 30.0) -> None:
    lock = JobLock(folder, heartbeat=heartbeat, stale_after=max(120.0, 2 * heartbeat))
    ready.put(lock.acquire())
    time.sleep(120)


def record(folder) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def write_lock(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(fields))


def lock_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == locks.__name__ and r.levelno >= logging.WARNING]


def eventually(cond, timeout: float = 10.0) -> bool:
    """Poll: a heartbeat thread on a loaded machine may run late."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def wait_for_zombie(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stat = locks._proc_stat(pid)
        if stat is None or stat[0] == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not die")


def test_a_second_process_is_refused_while_the_owner_lives_and_takes_over_after_sigkill(tmp_path, caplog):
    job = tmp_path / "job"
    ready = FORK.Queue()
    owner = FORK.Process(target=_own, args=(str(job), ready))
    owner.start()
    try:
        assert ready.get(timeout=60) is True
        rec = record(job)
        assert (rec["host"], rec["pid"]) == (host_name(), owner.pid) and rec["heartbeat"] > 0 and rec["started"]

        second = JobLock(job)
        assert second.acquire() is False
        assert second.holder["pid"] == owner.pid and f"pid {owner.pid} on {host_name()}" in second.holder_text
        with pytest.raises(JobLockBusy, match=f"pid {owner.pid}"):
            with JobLock(job):
                pass
        assert (job / LOCK_NAME).exists()  # a refused attempt leaves the owner's lock alone

        os.kill(owner.pid, signal.SIGKILL)
        wait_for_zombie(owner.pid)  # killed but not yet reaped: a zombie is dead too
        caplog.set_level(logging.WARNING)
        # (its other threads may outlive the zombie leader for a moment, holding the flock: wait a little)
        assert second.acquire(wait=10, poll=0.02) is True
        assert second.took_over["pid"] == owner.pid and second.holder is None
        [line] = lock_warnings(caplog)
        assert str(job) in line and f"pid {owner.pid}" in line and "dead" in line and "\n" not in line
        assert record(job)["pid"] == os.getpid() and second.held()
        second.release()
        assert not (job / LOCK_NAME).exists() and not second.held()
    finally:
        if owner.is_alive():
            owner.kill()
        owner.join()


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    with JobLock(tmp_path) as first:
        assert first.held()
        other = JobLock(tmp_path)
        assert other.acquire() is False and other.holder["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    with JobLock(tmp_path):
        pass


def test_the_heartbeat_advances(tmp_path):
    lock = JobLock(tmp_path, heartbeat=0.05, stale_after=1.0)
    assert lock.acquire()
    try:
        first = record(tmp_path)["heartbeat"]
        assert eventually(lambda: record(tmp_path)["heartbeat"] > first)
        assert record(tmp_path)["token"] == lock._record["token"]
    finally:
        lock.release()


def test_a_stale_heartbeat_of_another_host_is_taken_over_a_fresh_one_is_not(tmp_path, caplog):
    now = time.time()
    write_lock(tmp_path, host="node-elsewhere", pid=4242, started="2026-01-01T00:00:00", heartbeat=now - 5,
               machine="0badcafe", proc_start=1)
    lock = JobLock(tmp_path, stale_after=120)
    assert lock.acquire() is False and "pid 4242 on node-elsewhere" in lock.holder_text

    write_lock(tmp_path, host="node-elsewhere", pid=4242, started="2026-01-01T00:00:00", heartbeat=now - 500,
               machine="0badcafe", proc_start=1)
    caplog.set_level(logging.WARNING)
    assert lock.acquire() is True
    try:
        assert lock.took_over["host"] == "node-elsewhere"
        [line] = lock_warnings(caplog)
        assert "no heartbeat for 50" in line and "node-elsewhere" in line
    finally:
        lock.release()


def test_on_this_host_the_pid_decides_not_the_heartbeat(tmp_path):
    me = dict(host=host_name(), machine=machine_tag(), started="2026-01-01T00:00:00", heartbeat=time.time() - 10_000)
    write_lock(tmp_path, pid=os.getpid(), proc_start=process_start(os.getpid()), **me)  # live, heartbeat late
    assert JobLock(tmp_path).acquire() is False
    write_lock(tmp_path, pid=os.getpid(), proc_start=process_start(os.getpid()) - 1, **me)  # a recycled PID
    lock = JobLock(tmp_path)
    assert lock.acquire() is True
    lock.release()


def test_an_unreadable_lock_is_live_while_fresh_and_taken_over_when_old(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"")  # a creator between its O_EXCL create and its first write
    assert JobLock(tmp_path).acquire() is False
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = JobLock(tmp_path)
    assert lock.acquire() is True
    lock.release()


def test_release_never_removes_another_owners_lock(tmp_path, caplog):
    lock = JobLock(tmp_path, heartbeat=0.05, stale_after=1.0)
    assert lock.acquire()
    # meanwhile another process judged it dead and took over: a new file (inode) at the same path
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps({"host": "node-elsewhere", "pid": 7, "heartbeat": time.time()}))
    os.replace(tmp, tmp_path / LOCK_NAME)
    caplog.set_level(logging.WARNING)
    assert eventually(lambda: lock.lost) and not lock.held()
    assert any("no longer owns" in x for x in lock_warnings(caplog))
    lock.release()
    assert record(tmp_path)["pid"] == 7  # the new owner's heartbeat was not overwritten, nor its file removed


def test_a_forked_child_does_not_release_its_parents_lock(tmp_path):
    lock = JobLock(tmp_path)
    assert lock.acquire()
    try:
        child = FORK.Process(target=lock.release)
        child.start()
        child.join(30)
        assert child.exitcode == 0 and lock.held() and (tmp_path / LOCK_NAME).exists()
    finally:
        lock.release()


def test_check_lock_coherent_on_a_local_filesystem(tmp_path):
    check = check_lock_coherent(tmp_path)
    assert check.ok and check.exclusive_create and check.flock == "exclusive"
    assert check.fstype != "unknown" and check.message
    assert list(tmp_path.iterdir()) == []  # its probe files are gone


@pytest.mark.parametrize("fstype,options,expected", [
    ("nfs4", "rw,vers=4.2,local_lock=none", True), ("nfs", "rw,nolock", False), ("nfs4", "rw,local_lock=flock", False),
    ("lustre", "rw,flock", True), ("lustre", "rw,localflock", False), ("lustre", "rw", None),
    ("ext4", "rw,relatime", "local"), ("fuse.sshfs", "rw", None)])
def test_cross_node_coherence_is_read_from_the_mount(fstype, options, expected):
    assert locks._cross_node(fstype, options) == expected


def test_stale_after_must_exceed_the_heartbeat(tmp_path):
    with pytest.raises(ValueError, match="stale_after"):
        JobLock(tmp_path, heartbeat=30, stale_after=10)


def test_a_process_that_exits_without_releasing_leaves_no_lock(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from subgroup_robustness.utils.locks import JobLock; "
            "assert JobLock(sys.argv[1]).acquire(); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert done.returncode == 3 and not (tmp_path / LOCK_NAME).exists()
