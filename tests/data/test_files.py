"""Broken files name the file and the line, in one short line with advice; archives unpack atomically;
an archive is fetched once per cache; the hub reader names what is missing."""

from __future__ import annotations

import json
import sys
import types
import zipfile
from pathlib import Path

import pytest

from subgroup_robustness.data.sources import civilcomments, files, multinli, scotus
from subgroup_robustness.data.sources.fetch import cached_fetch, read_hub
from subgroup_robustness.utils.errors import CorruptDataError, DataUnavailableError
from tests.data.fixtures import (
    UNREACHABLE, civil_rows, mnli_parts, scotus_parts, write_fairlex, write_mnli_local_jsonl, write_wilds_csv,
    zip_fairlex,
)

# bytes that are not UTF-8 anywhere (0x80-0xBF cannot start a character), with line breaks among them
GARBAGE = bytes(range(0x80, 0xC0)) * 300 + b"\n" + bytes(range(0x80, 0xC0)) * 100 + b"\n"


def _message(info) -> str:
    text = str(info.value)
    assert "\n" not in text and len(text) < 600, text  # one line, never the undecoded buffer
    return text


def test_binary_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(GARBAGE)
    with pytest.raises(CorruptDataError) as info:
        multinli.load(tmp_path / "cache", path=path)
    msg = _message(info)
    assert f"{path}, line 1: not UTF-8 text (b'\\x80\\x81" in msg
    assert "corrupt or truncated — check the path" in msg


def test_garbage_after_good_lines_names_its_line(tmp_path):
    path = write_mnli_local_jsonl(tmp_path / "dev.jsonl", mnli_parts(20, 1)["train"])
    with open(path, "ab") as fh:
        fh.write(b"\xff\xfe\x00garbage\n")
    with pytest.raises(CorruptDataError, match=r"dev.jsonl, line 21: not UTF-8 text \(b'\\xff\\xfe\\x00garbage'\)"):
        multinli.load(tmp_path / "cache", path=path)


def test_truncated_last_line_shows_its_start(tmp_path):
    rows = mnli_parts(12, 1)["train"]
    path = write_mnli_local_jsonl(tmp_path / "dev.jsonl", rows)
    path.write_bytes(path.read_bytes()[:-15])
    with pytest.raises(CorruptDataError) as info:
        multinli.load(tmp_path / "cache", path=path)
    msg = _message(info)
    last = json.dumps({"premise": rows[-1]["sentence1"]})[:20]
    assert f"dev.jsonl, line {len(rows)}: not valid JSON" in msg and repr(last)[1:-1] in msg
    assert msg.endswith("the file is corrupt or truncated — check the path, or replace the file with a fresh copy.")


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2, 3]\n')
    with pytest.raises(CorruptDataError, match=r"x.jsonl, line 3: not a JSON object \('\[1, 2, 3\]'\)"):
        files.read_jsonl(path, "test")


def test_a_corrupt_cached_file_says_to_delete_it(tmp_path):
    cache = tmp_path / "cache"
    write_fairlex(cache / "fairlex_scotus", scotus_parts())  # as the download leaves it
    (cache / "fairlex_scotus" / "test.jsonl").write_bytes(GARBAGE)
    with pytest.raises(CorruptDataError) as info:
        scotus.load(cache, url=f"{UNREACHABLE}/scotus.zip")
    msg = _message(info)
    assert "test.jsonl, line 1: not UTF-8 text" in msg and msg.endswith(files.REFETCH + ".")


def test_binary_csv_names_the_file_and_line(tmp_path):
    path = tmp_path / "all_data_with_identities.csv"
    path.write_bytes(GARBAGE)
    with pytest.raises(CorruptDataError) as info:
        civilcomments.load(tmp_path / "cache", path=path)
    assert f"{path}, line 1: not utf-8 text (b'\\x80\\x81" in _message(info)


def test_binary_csv_row_after_the_header_is_named(tmp_path):
    rows = civil_rows(5)
    rows[3]["comment_text"] = "MARK"
    path = write_wilds_csv(tmp_path / "all_data_with_identities.csv", rows)
    path.write_bytes(path.read_bytes().replace(b"MARK", b"\xc3\x28 not utf-8"))  # row 3 is line 5
    with pytest.raises(CorruptDataError, match=r"all_data_with_identities.csv, line 5: not utf-8 text \(b'3,239003,"):
        civilcomments.load(tmp_path / "cache", path=path)


def test_truncated_csv_names_its_last_line(tmp_path):
    path = write_wilds_csv(tmp_path / "all_data_with_identities.csv", civil_rows(8))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptDataError) as info:
        civilcomments.load(tmp_path / "cache", path=path)
    msg = _message(info)
    assert "all_data_with_identities.csv, line 9: the last line has no line break ('7,239007," in msg
    path.write_bytes(b"")
    with pytest.raises(CorruptDataError, match="all_data_with_identities.csv: the file is empty"):
        civilcomments.load(tmp_path / "cache", path=path)


def test_csv_parser_errors_give_pandas_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n3,4\n5,6,7\n8,9\n")
    with pytest.raises(CorruptDataError, match=r"t.csv, line 4: cannot be parsed \(Expected 2 fields, saw 3\)"):
        files.read_csv(path, "test", complete=True)


def test_fix_depends_on_whose_file_it_is(tmp_path):
    cache = tmp_path / "cache"
    assert files.fix_for(cache / "sub" / "f.jsonl", cache) == files.REFETCH
    assert files.fix_for(tmp_path / "mine" / "f.jsonl", cache) == files.REPLACE
    assert files.fix_for(cache / "f.jsonl", None) == files.REPLACE


def test_a_member_failing_its_crc_leaves_no_file(tmp_path):
    data = b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(2000))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("train.jsonl", data)
    raw = bytearray(archive.read_bytes())
    at = raw.index(data[5000:5010])
    raw[at:at + 10] = b"X" * 10  # stored (not deflated): the bytes read fine, the CRC does not match
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "out" / "train.jsonl"
    with pytest.raises(CorruptDataError, match="a.zip is corrupt or truncated"):
        files.extract_members(archive, {"train.jsonl": dest}, "test")
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no part file either


def test_an_archive_placed_by_hand_is_used_offline(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    zip_fairlex(cache / "scotus.zip", scotus_parts())
    folder = scotus.fetch(cache, url=f"{UNREACHABLE}/scotus.zip")
    assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    assert not (cache / "scotus.zip").exists()


def test_cached_fetch_verifies_before_unpacking(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    zip_fairlex(cache / "bundle.zip", scotus_parts())
    seen = []

    def reject(archive: Path) -> None:
        seen.append(archive.name)
        raise CorruptDataError(f"test: {archive} fails the check.")

    with pytest.raises(CorruptDataError, match="bundle.zip fails the check. It was removed; run again"):
        cached_fetch(f"{UNREACHABLE}/x", cache / "out", ["train.jsonl"], archive=cache / "bundle.zip", what="test",
                     how_to_point="", verify=reject)
    assert seen == ["bundle.zip"] and not (cache / "bundle.zip").exists() and not (cache / "out").exists()
    with pytest.raises(DataUnavailableError, match=r"test: no local copy .* Or place bundle.zip in"):
        cached_fetch(f"{UNREACHABLE}/x", cache / "out", ["train.jsonl"], archive=cache / "bundle.zip", what="test",
                     how_to_point="")


def test_hub_reader_names_a_missing_split(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a: {"train": object(), "test": object()}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataUnavailableError, match=r"'org/x'/'cfg' on the hub has no split\(s\) \['validation'\]"):
        read_hub("org/x", "cfg", ["train", "validation"], what="test", instead="format=local", how_to_point="")
    assert set(read_hub("org/x", None, ["train"], what="test", instead="", how_to_point="")) == {"train", "test"}
