"""Atomic writes: a failed write (a full disk included) leaves the old file and no temporary behind."""

import errno
import json

import pytest
from _full_disk import SmallDisk

import datatools.atomic
import datatools.csv_rows
from datatools.atomic import atomic_file, write_json_atomic
from datatools.csv_rows import AtomicCsvWriter


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_file(target, "w") as file:
        file.write('{"step": ')
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_name_of_250_bytes_can_be_written(tmp_path):
    target = tmp_path / ("猫" * 82 + ".jpg")  # 250 bytes in UTF-8; the file system takes 255
    with atomic_file(target) as file:
        file.write(b"image")
    assert target.read_bytes() == b"image"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_csv_writer_writes_a_name_of_250_bytes(tmp_path):
    target = tmp_path / ("猫" * 82 + ".csv")
    with AtomicCsvWriter(target, ["text"]) as writer:
        writer.write({"text": "一只猫"})
        writer.commit()
    assert target.read_text(encoding="utf-8").splitlines() == ["text", "一只猫"]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    monkeypatch.setattr(datatools.atomic, "open", SmallDisk(free_bytes=10).open, raising=False)
    with pytest.raises(OSError) as raised:
        write_json_atomic(target, {"step": 2, "padding": "x" * 100})  # fails as the file is flushed
    assert raised.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("rows", [1, 1000], ids=["full_at_finish", "full_while_writing"])
def test_the_csv_writer_on_a_full_disk_raises_enospc_and_leaves_no_part_file(tmp_path, monkeypatch, rows):
    monkeypatch.setattr(datatools.csv_rows, "open", SmallDisk(free_bytes=100).open, raising=False)
    with pytest.raises(OSError) as raised, AtomicCsvWriter(tmp_path / "out.csv", ["text"]) as writer:
        for _ in range(rows):
            writer.write({"text": "一只猫" * 20})
        writer.commit()
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_discarding_on_a_full_disk_removes_the_part_file(tmp_path, monkeypatch):
    disk = SmallDisk(free_bytes=0)
    monkeypatch.setattr(datatools.csv_rows, "open", disk.open, raising=False)
    writer = AtomicCsvWriter(tmp_path / "out.csv", ["text"])
    writer.write({"text": "一只猫"})
    writer.discard()  # closing flushes, which fails on the full disk: the file must go all the same
    assert list(tmp_path.iterdir()) == []
