"""Atomic writes: a failed write leaves the old file and no temporary behind."""

import json

import pytest

from datatools.atomic import atomic_file, write_json_atomic
from datatools.image_check import AtomicCsvWriter


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
