"""filter_data.py end to end on a directory of good and bad images, and check_image case by case."""

import csv
import hashlib
from pathlib import Path

import pytest
from _full_disk import SmallDisk, leftovers, tmpfs
from _http_server import encode, heavy_modules_after_help, png_claiming, two_tone
from PIL import Image

import datatools.csv_rows
import filter_data
from datatools.image_check import check_image

JPEG = encode(two_tone((60, 40)), "JPEG")
IMAGES = {  # filename: (bytes, reason or None)
    "good.jpg": (JPEG, None),
    "good.png": (encode(two_tone((40, 60)), "PNG"), None),
    "good.webp": (encode(two_tone((40, 40)), "WEBP"), None),
    "gray.jpg": (encode(two_tone((40, 40), "L"), "JPEG"), None),
    "子目录/猫.jpg": (JPEG, None),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "truncated"),
    "empty.jpg": (b"", "empty"),
    "html.jpg": (b"<html>not an image</html>", "not_an_image"),
    "tiny.jpg": (encode(two_tone((5, 5)), "JPEG"), "too_small"),
    "banner.jpg": (encode(two_tone((300, 20)), "JPEG"), "bad_aspect_ratio"),
    "bomb.png": (png_claiming(30_000, 30_000), "decompression_bomb"),
    "over_limit.png": (encode(Image.new("L", (1200, 1000)), "PNG"), "decompression_bomb"),
}
ROWS = [  # text, filename, reason
    *[("一只猫", name, reason) for name, (_, reason) in IMAGES.items()],
    ("一只狗", "missing.jpg", "missing_file"),
    ("", "good.jpg", "missing_text"),
    ("   ", "good.jpg", "missing_text"),
    ("文字", "", "missing_filename"),
    ("文字", "../outside.jpg", "unsafe_filename"),
    ("文字", "/etc/hostname", "unsafe_filename"),
    ("文字", "子目录", "missing_file"),  # a directory, not an image
    ("文字", "猫" * 90 + ".jpg", "filename_too_long"),  # 274 bytes: no file can have this name
]
LIMITS = ["--min_side", "10", "--max_aspect_ratio", "10", "--max_pixels", "1000000"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def dataset(tmp_path):
    """A CSV of ROWS (plus an extra column) and its image directory."""
    images = tmp_path / "images"
    for name, (data, _) in IMAGES.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes(JPEG)
    csv_path = tmp_path / "train.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "url", "filename", "source"])
        for index, (text, filename, _) in enumerate(ROWS):
            writer.writerow([text, f"http://example.invalid/{index}", filename, f"s{index}"])
    return csv_path, images


def run(dataset, workers: int, output_name: str = "train.filtered.csv") -> Path:
    csv_path, images = dataset
    output = csv_path.parent / output_name
    argv = ["--input", str(csv_path), "--image_path", str(images), "--output", str(output)]
    assert filter_data.main([*argv, "--workers", str(workers), *LIMITS]) == 0
    return output


def test_kept_rows_are_the_good_ones_in_input_order_with_all_columns(dataset):
    kept = read_rows(run(dataset, workers=2))
    expected = [(text, name) for text, name, reason in ROWS if reason is None]
    assert [(row["text"], row["filename"]) for row in kept] == expected
    assert all(row["source"] and row["url"] for row in kept)


def test_rejected_rows_carry_their_reason(dataset):
    output = run(dataset, workers=2)
    rejected = read_rows(output.with_name("train.filtered.rejected.csv"))
    expected = [(text, name, reason) for text, name, reason in ROWS if reason is not None]
    assert [(row["text"], row["filename"], row["reason"]) for row in rejected] == expected


def test_worker_processes_agree_with_a_single_process_run(dataset):
    parallel = run(dataset, workers=2, output_name="parallel.csv")
    serial = run(dataset, workers=0, output_name="serial.csv")
    assert parallel.read_text() == serial.read_text()
    assert (
        parallel.with_name("parallel.rejected.csv").read_text()
        == serial.with_name("serial.rejected.csv").read_text()
    )


def test_images_are_never_changed_or_deleted(dataset):
    images = dataset[1]
    before = {
        path: hashlib.sha256(path.read_bytes()).hexdigest() for path in images.rglob("*") if path.is_file()
    }
    run(dataset, workers=2)
    after = {
        path: hashlib.sha256(path.read_bytes()).hexdigest() for path in images.rglob("*") if path.is_file()
    }
    assert after == before


def test_summary_counts_each_reason(dataset, capsys):
    run(dataset, workers=0)
    out = capsys.readouterr().out
    kept = sum(reason is None for _, _, reason in ROWS)
    assert f"kept {kept} of {len(ROWS)} rows" in out
    assert "missing_text" in out and "decompression_bomb" in out


def test_ctrl_c_writes_no_output(dataset, monkeypatch):
    checked = filter_data.check_rows

    def interrupted_after_three(*args, **kwargs):
        for index, item in enumerate(checked(*args, **kwargs)):
            if index == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(filter_data, "check_rows", interrupted_after_three)
    csv_path, images = dataset
    argv = [
        "--input",
        str(csv_path),
        "--image_path",
        str(images),
        "--output",
        str(csv_path.parent / "out.csv"),
    ]
    assert filter_data.main([*argv, "--workers", "2"]) == 130
    assert sorted(path.name for path in csv_path.parent.iterdir()) == ["images", "outside.jpg", "train.csv"]


def test_missing_input_exits_2_naming_the_file(tmp_path, capsys):
    argv = [
        "--input",
        str(tmp_path / "nope.csv"),
        "--image_path",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
    ]
    assert filter_data.main(argv) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_missing_column_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("caption,filename\na,b\n")
    argv = [
        "--input",
        str(tmp_path / "train.csv"),
        "--image_path",
        str(tmp_path),
        "--output",
        str(tmp_path / "o.csv"),
    ]
    assert filter_data.main(argv) == 2
    assert "text" in capsys.readouterr().err


def test_output_equal_to_input_is_refused(dataset, capsys):
    csv_path, images = dataset
    argv = ["--input", str(csv_path), "--image_path", str(images), "--output", str(csv_path)]
    before = csv_path.read_bytes()
    assert filter_data.main(argv) == 2
    assert csv_path.read_bytes() == before


def test_output_whose_rejected_rows_would_overwrite_the_input_is_refused(dataset, capsys):
    csv_path, images = dataset
    rejected_input = csv_path.with_name("train.rejected.csv")
    rejected_input.write_bytes(csv_path.read_bytes())
    argv = ["--input", str(rejected_input), "--image_path", str(images)]
    before = rejected_input.read_bytes()
    assert filter_data.main([*argv, "--output", str(csv_path.with_name("train.csv"))]) == 2
    assert rejected_input.read_bytes() == before
    assert "rejected rows" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_max_aspect_ratio_that_is_not_a_finite_number_in_range_exits_2(dataset, capsys, value):
    csv_path, images = dataset
    output = csv_path.with_name("out.csv")
    argv = ["--input", str(csv_path), "--image_path", str(images), "--output", str(output)]
    assert filter_data.main([*argv, "--max_aspect_ratio", value]) == 2
    assert "max_aspect_ratio" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_check_image(tmp_path, name):
    data, reason = IMAGES[name]
    path = tmp_path / "image"
    path.write_bytes(data)
    assert check_image(path, min_side=10, max_aspect_ratio=10, max_pixels=1_000_000) == reason


def test_check_image_limits_can_be_switched_off(tmp_path):
    path = tmp_path / "banner.jpg"
    path.write_bytes(IMAGES["banner.jpg"][0])
    assert check_image(path, min_side=0, max_aspect_ratio=0) is None


def test_help_loads_neither_torch_nor_transformers():
    assert heavy_modules_after_help("filter_data") == []


def long_caption_csv(path: Path, rows: int = 300) -> Path:
    """Rows whose images do not exist: each is rejected, so ~500 bytes of rejected rows per row."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "filename"])
        writer.writerows([("一只猫在沙发上" * 20, f"{index}.jpg") for index in range(rows)])
    return path


def assert_full_disk_ended_cleanly(exit_code: int, err: str, output_dir: Path) -> None:
    assert exit_code == 1
    assert "Traceback" not in err and "No space left on device" in err and "no output written" in err
    assert not list(output_dir.glob("out*.csv")) and leftovers(output_dir) == []


def test_a_full_disk_ends_with_one_line_and_leaves_no_part_file(tmp_path, monkeypatch, capsys):
    csv_path = long_caption_csv(tmp_path / "train.csv")
    monkeypatch.setattr(datatools.csv_rows, "open", SmallDisk(free_bytes=20_000).open, raising=False)
    argv = ["--input", str(csv_path), "--image_path", str(tmp_path), "--output", str(tmp_path / "out.csv")]
    exit_code = filter_data.main([*argv, "--workers", "0"])
    assert_full_disk_ended_cleanly(exit_code, capsys.readouterr().err, tmp_path)


def test_a_real_full_tmpfs_ends_with_one_line_and_leaves_no_part_file(tmp_path, capsys):
    csv_path = long_caption_csv(tmp_path / "train.csv")
    with tmpfs(tmp_path / "small") as small:
        argv = ["--input", str(csv_path), "--image_path", str(tmp_path), "--output", str(small / "out.csv")]
        exit_code = filter_data.main([*argv, "--workers", "0"])
        assert_full_disk_ended_cleanly(exit_code, capsys.readouterr().err, small)
