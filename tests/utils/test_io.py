"""File helpers (issue #17): atomic writes and lock files honour the umask; a JSON record that is null,
garbage or truncated is a one-line CorruptDataError naming the file, a missing one is None."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest

from subgroup_robustness.utils import io
from subgroup_robustness.utils.errors import CorruptDataError
from subgroup_robustness.utils.io import (atomic_copy, atomic_write_bytes, atomic_write_json, file_lock,
                                          read_json_record)


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    with open(tmp_path / "b.bin", "rb") as src:
        atomic_copy(src, tmp_path / "c.bin")
    assert [mode(tmp_path / n) for n in ("a.json", "b.bin", "c.bin")] == [expected] * 3
    assert io._umask() == mask and os.umask(mask) == mask  # reading the umask does not change it


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_file_lock_creates_its_lock_file_under_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    with file_lock(tmp_path / "sub" / "x.lock"):
        assert mode(tmp_path / "sub" / "x.lock") == expected


def test_file_lock_works_on_a_lock_file_it_may_not_write(tmp_path, monkeypatch):
    """A colleague's lock file without group write permission: flock needs only a read-only descriptor."""
    path = tmp_path / "x.lock"
    path.touch()
    path.chmod(0o444)
    if os.geteuid() == 0:  # root may write anything: refuse the write access as the kernel would
        real_open = os.open

        def no_write(p, flags, *a, **k):
            if os.fspath(p) == str(path) and flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, flags, *a, **k)

        monkeypatch.setattr(io.os, "open", no_write)
    with file_lock(path):
        other = open(path, "rb")
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            other.close()


def test_read_json_record(tmp_path):
    assert read_json_record(tmp_path / "missing.json") is None
    (tmp_path / "ok.json").write_text('{"status": "completed"}')
    assert read_json_record(tmp_path / "ok.json") == {"status": "completed"}
    cases = {"null.json": (b"null", "JSON null"), "list.json": (b"[1, 2]", "JSON array"),
             "number.json": (b"3", "JSON number"), "garbage.json": (b"<html>oops</html>", "not valid JSON"),
             "truncated.json": (b'{"status": "completed", "metr', "line 1 column"),
             "empty.json": (b"", "empty file"), "blank.json": (b"  \n", "empty file"),
             "binary.json": (b"\xff\xfe\x00\x01", "not UTF-8")}
    for name, (data, what) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptDataError) as err:
            read_json_record(tmp_path / name)
        text = str(err.value)
        assert str(tmp_path / name) in text and what in text and "\n" not in text, (name, text)
        exc = err.value  # one line, no chained traceback
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_read_json_record_lets_other_os_errors_name_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        read_json_record(tmp_path)
