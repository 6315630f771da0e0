"""Atomic writes: a failed write leaves the old file and no temporary behind."""

import json

import pytest

from datatools.atomic import atomic_file, write_json_atomic


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(RuntimeError), atomic_file(target, "w") as file:
        file.write('{"step": ')
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
