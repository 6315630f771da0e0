"""download_image.py --output_format webdataset end to end against a loopback server: the shards'
layout (read back by the webdataset package and by tarfile), determinism, resume, parts,
atomicity and failure records."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from _full_disk import SmallDisk, leftovers
from _http_server import REPO, LoopbackServer, Route, encode, two_tone
from PIL import Image

import datatools.shard_writer
import download_image
from datatools.shard_writer import Part, ShardedOutput, ShardLayout

# Generous: under load a connection may wait for a full listen backlog; bad rows fail at once all the same.
FAST = ["--timeout", "5", "--deadline", "20", "--retries", "2", "--backoff", "0.05", "--short_side", "40"]
SHARD_SIZE = 5
ROWS = 23  # five shards, the last one of three rows
BAD_ROWS = {3: ("/missing", "http_404"), 8: ("/html", "not_an_image"), 12: ("ftp://x/1.jpg", "bad_url")}


def image_path(index: int) -> str:
    return f"/img/{index}.jpg"


def write_csv(path: Path, server: LoopbackServer, rows: int = ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "url", "filename", "source"])
        for index in range(rows):
            url = BAD_ROWS[index][0] if index in BAD_ROWS else image_path(index)
            url = server.url(url) if url.startswith("/") else url
            writer.writerow([f"第{index}只猫", url, f"{index}.jpg", "test"])
    return path


@pytest.fixture(scope="module")
def server():
    """Distinct images (80+index px wide), some answering later than others, so that downloads
    finish out of row order; a 404 and an HTML page."""
    loopback = LoopbackServer()
    for index in range(ROWS):
        body = encode(two_tone((80 + index, 60)), "JPEG", quality=90)
        loopback.routes[image_path(index)] = Route(body=body, delay=0.06 * (index % 3 == 0))
    loopback.routes["/html"] = Route(body=b"<html>sorry</html>", headers={"Content-Type": "text/html"})
    with loopback.running():
        yield loopback


def run(csv_path: Path, output: Path, *extra: str, threads: int = 8) -> int:
    argv = ["--input", str(csv_path), "--output", str(output), "--output_format", "webdataset"]
    return download_image.main(
        [*argv, "--shard_size", str(SHARD_SIZE), "--threads", str(threads), *FAST, *extra]
    )


def tar_contents(output: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Each shard's members, in order, with their bytes."""
    contents = {}
    for path in sorted(output.glob("*.tar")):
        with tarfile.open(path) as tar:
            contents[path.name] = [(member.name, tar.extractfile(member).read()) for member in tar]
    return contents


@pytest.fixture(scope="module")
def single_run(server, tmp_path_factory):
    """One run of the whole CSV with 8 threads."""
    root = tmp_path_factory.mktemp("shards")
    csv_path = write_csv(root / "train.csv", server)
    before = sum(server.requests.values())
    exit_code = run(csv_path, root / "out")
    return {
        "csv": csv_path,
        "output": root / "out",
        "exit_code": exit_code,
        "requests": sum(server.requests.values()) - before,
        "contents": tar_contents(root / "out"),
    }


def test_shards_are_named_and_sized_as_img2dataset_and_open_clip_expect(single_run):
    output = single_run["output"]
    assert single_run["exit_code"] == 0
    names = sorted(path.name for path in output.iterdir())
    shards = [f"{shard:05d}" for shard in range(5)]
    expected = [f"{s}{suffix}" for s in shards for suffix in (".tar", "_failed.csv", "_stats.json")]
    assert names == sorted([*expected, "sizes.json"])
    sizes = json.loads((output / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 4, "00003.tar": 5, "00004.tar": 3}


def test_each_shard_holds_its_rows_in_row_order_with_img2dataset_keys(single_run):
    contents = single_run["contents"]
    for shard in range(5):
        rows = range(shard * SHARD_SIZE, min(ROWS, (shard + 1) * SHARD_SIZE))
        # img2dataset's key: 10**ceil(log10(shard_size)) * shard + position, 5 + 1 digits wide
        keys = [f"{10 * shard + row - shard * SHARD_SIZE:06d}" for row in rows if row not in BAD_ROWS]
        names = [name for name, _ in contents[f"{shard:05d}.tar"]]
        assert names == [f"{key}.{ext}" for key in keys for ext in ("jpg", "txt", "json")]


def test_a_sample_has_its_image_caption_and_img2dataset_metadata(single_run, server):
    members = dict(single_run["contents"]["00001.tar"])
    assert members["000011.txt"].decode() == "第6只猫"
    meta = json.loads(members["000011.json"])
    assert meta == {
        "url": server.url(image_path(6)),
        "caption": "第6只猫",
        "filename": "6.jpg",
        "source": "test",
        "key": "000011",
        "status": "success",
        "error_message": None,
        "width": 57,
        "height": 40,
        "original_width": 86,
        "original_height": 60,
        "sha256": meta["sha256"],
    }
    with Image.open(io.BytesIO(members["000011.jpg"])) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (57, 40))


def test_shards_are_read_back_by_the_webdataset_package(single_run):
    webdataset = pytest.importorskip("webdataset")
    pattern = str(single_run["output"] / "{00000..00004}.tar")
    samples = list(webdataset.WebDataset(pattern, shardshuffle=False))
    kept = [index for index in range(ROWS) if index not in BAD_ROWS]
    assert [sample["txt"].decode() for sample in samples] == [f"第{index}只猫" for index in kept]
    for sample in samples:
        assert json.loads(sample["json"])["key"] == sample["__key__"]
        Image.open(io.BytesIO(sample["jpg"])).load()


def test_failed_rows_are_recorded_with_their_reasons_in_the_shard_files(single_run):
    output = single_run["output"]
    failed = {}
    for path in sorted(output.glob("*_failed.csv")):
        with open(path, newline="", encoding="utf-8") as file:
            failed.update({row["filename"]: (row["key"], row["reason"]) for row in csv.DictReader(file)})
    assert failed == {
        "3.jpg": ("000003", "http_404"),
        "8.jpg": ("000013", "not_an_image"),
        "12.jpg": ("000022", "bad_url"),
    }
    stats = json.loads((output / "00001_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (
        5,
        4,
        0,
        1,
    )
    assert stats["status_dict"] == {"success": 4, "not_an_image": 1}


def test_the_same_input_gives_byte_identical_shards_whatever_the_thread_count(single_run, tmp_path):
    assert run(single_run["csv"], tmp_path / "one_thread", threads=1) == 0
    assert tar_contents(tmp_path / "one_thread") == single_run["contents"]
    for name in single_run["contents"]:
        assert (tmp_path / "one_thread" / name).read_bytes() == (single_run["output"] / name).read_bytes()


def test_a_rerun_skips_finished_shards_without_a_request(single_run, server, capsys):
    before = dict(server.requests)
    assert run(single_run["csv"], single_run["output"]) == 0
    assert dict(server.requests) == before
    assert "0 downloaded" in capsys.readouterr().out
    assert tar_contents(single_run["output"]) == single_run["contents"]


def test_parts_together_equal_the_single_run(single_run, tmp_path):
    output = tmp_path / "parts"
    for part in ("1/3", "2/3", "3/3"):
        assert run(single_run["csv"], output, "--part", part) == 0
        if part == "1/3":  # shards 0 and 3 only
            assert sorted(path.name for path in output.glob("*.tar")) == ["00000.tar", "00003.tar"]
    assert tar_contents(output) == single_run["contents"]
    assert (output / "sizes.json").read_text() == (single_run["output"] / "sizes.json").read_text()


def test_ctrl_c_keeps_finished_shards_and_discards_the_one_being_written(single_run, tmp_path, monkeypatch):
    planned = ShardedOutput.tasks

    def interrupted_in_shard_1(self, rows):
        for index, task in enumerate(planned(self, rows)):
            if index == SHARD_SIZE + 2:
                raise KeyboardInterrupt
            yield task

    monkeypatch.setattr(ShardedOutput, "tasks", interrupted_in_shard_1)
    output = tmp_path / "out"
    # One thread keeps at most two rows in flight, so shard 0 is complete before the interrupt.
    assert run(single_run["csv"], output, threads=1) == 130
    assert tar_contents(output) == {"00000.tar": single_run["contents"]["00000.tar"]}
    assert json.loads((output / "sizes.json").read_text()) == {"00000.tar": 4}
    assert leftovers(output) == [] and not (output / "00001_stats.json").exists()
    monkeypatch.setattr(ShardedOutput, "tasks", planned)
    assert run(single_run["csv"], output) == 0  # the rest, as if never interrupted
    assert tar_contents(output) == single_run["contents"]


def test_a_killed_run_leaves_only_complete_tars(server, tmp_path):
    server.routes["/hang.jpg"] = Route(body=b"", delay=30)
    csv_path = write_csv(tmp_path / "train.csv", server, rows=8)
    text = csv_path.read_text(encoding="utf-8").replace(image_path(7), "/hang.jpg")
    csv_path.write_text(text, encoding="utf-8")
    output = tmp_path / "out"
    command = [sys.executable, "download_image.py", "--input", str(csv_path), "--output", str(output)]
    command += ["--output_format", "webdataset", "--shard_size", str(SHARD_SIZE), "--timeout", "60"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (output / "00000_stats.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # shard 1 is being written, its last row hanging
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert sorted(path.name for path in output.glob("*.tar")) == ["00000.tar"]
    with tarfile.open(output / "00000.tar") as tar:
        assert len(tar.getnames()) == 3 * 4
    assert any(path.name.endswith(".tmp") for path in output.iterdir())  # shard 1, hidden, never a .tar


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_temp_files(
    single_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(datatools.shard_writer, "open", SmallDisk(free_bytes=6_000).open, raising=False)
    output = tmp_path / "out"
    assert run(single_run["csv"], output) == 1
    err = capsys.readouterr().err
    # The loopback server's own threads may print a broken pipe when the run drops its connections.
    ours = [block for block in err.split("Traceback")[1:] if "socketserver.py" not in block]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert ours == [] and len(errors) == 1 and errors[0].startswith(f"error: cannot write to {output}")
    assert "No space left on device" in errors[0]
    assert leftovers(output) == [] and not list(output.glob("*.tar"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--part", "0/3"], "--part must be K/N"),
        (["--part", "4/3"], "--part must be K/N"),
        (["--part", "two"], "--part must be K/N"),
        (["--shard_size", "0"], "--shard_size must be at least 1"),
        (["--retry_failed"], "--retry_failed works with --output_format files"),
    ],
)
def test_bad_shard_options_exit_2_naming_them(single_run, tmp_path, capsys, extra, message):
    assert run(single_run["csv"], tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_part_owns_every_nth_shard_and_layout_gives_img2dataset_keys():
    assert [shard for shard in range(7) if Part.parse("2/3").owns(shard)] == [1, 4]
    layout = ShardLayout(10_000, 25_000)
    assert (layout.shard_count, layout.rows_in(2), layout.key(0, 12), layout.key(2, 5)) == (
        3,
        5_000,
        "000000012",
        "000020005",
    )
