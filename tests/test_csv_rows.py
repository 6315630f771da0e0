"""The one CSV reader: strict parsing, encodings and header spelling, the same in all three readers
(download_image.py, filter_data.py and training's read_image_text_csv)."""

import csv
import logging
import re
from pathlib import Path

import pytest

import download_image
import filter_data
from component.training.dataset import DataError, StringColumn, read_image_text_csv
from datatools.csv_rows import MAX_RECORD_LINES, CsvTable, InputError

CAPTIONS = [f"第{index}张图片：一只猫" for index in range(1, 11)]


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(f"{line}\n" for line in lines).encode(encoding))
    return path


def ten_rows(texts: list[str] = CAPTIONS) -> list[str]:
    """Lines of a 10-row CSV whose URLs are refused without a request (so no server is needed)."""
    return ["text,url,filename"] + [
        f"{text},ftp://example.invalid/{i}.jpg,{i}.jpg" for i, text in enumerate(texts)
    ]


def read_utf8_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def run_download(csv_path: Path, tmp_path: Path, *options: str) -> int:
    output = tmp_path / "images"
    return download_image.main(
        ["--input", str(csv_path), "--output", str(output), "--threads", "2", *options]
    )


def run_filter(csv_path: Path, tmp_path: Path, *options: str) -> int:
    argv = ["--input", str(csv_path), "--image_path", str(tmp_path), "--output", str(tmp_path / "kept.csv")]
    return filter_data.main([*argv, "--workers", "0", *options])


def texts_seen_by_all_three(csv_path: Path, tmp_path: Path, *options: str) -> dict[str, list[str]]:
    """The captions each reader read: training's rows, filter_data's rejected rows (no image exists)
    and download_image's failure list (every URL is refused), the last two read back as UTF-8."""
    encoding = options[1] if options else None
    assert run_filter(csv_path, tmp_path, *options) == 0
    assert run_download(csv_path, tmp_path, *options) == 0
    return {
        "training": read_image_text_csv(csv_path, encoding).texts.tolist(),
        "filter_data": [row["text"] for row in read_utf8_rows(tmp_path / "kept.rejected.csv")],
        "download_image": [
            row["text"] for row in read_utf8_rows(tmp_path / "images" / "download_failed.csv")
        ],
    }


# --- a stray quote: refused by all three, naming the line it opens on ----------------------------


@pytest.mark.parametrize("closed_later", [False, True], ids=["unclosed", "closed_by_a_later_quote"])
def test_a_stray_quote_is_refused_by_all_three_readers_naming_its_line(tmp_path, capsys, closed_later):
    texts = list(CAPTIONS)
    texts[2] = '"' + texts[2]  # row 3, on line 4: a quote that swallowed the 7 rows after it
    if closed_later:
        texts[6] = '"第7张图片, 一只猫"'  # its opening quote closes the stray one, mid-line
    csv_path = write_lines(tmp_path / "train.csv", ten_rows(texts))
    line_4 = re.compile(r"starting on line 4\b")

    assert run_download(csv_path, tmp_path) == 2
    assert line_4.search(capsys.readouterr().err)
    assert not (tmp_path / "images" / "download_report.json").exists()
    assert run_filter(csv_path, tmp_path) == 2
    assert line_4.search(capsys.readouterr().err)
    assert not (tmp_path / "kept.csv").exists()
    with pytest.raises(DataError, match=line_4):
        read_image_text_csv(csv_path)


def test_a_quoted_caption_with_line_breaks_is_read_by_all_three(tmp_path):
    texts = [*CAPTIONS[:3], '"一只猫\n在沙发上，""睡着了"""', *CAPTIONS[4:]]
    csv_path = write_lines(tmp_path / "train.csv", ten_rows(texts))
    expected = [*CAPTIONS[:3], '一只猫\n在沙发上，"睡着了"', *CAPTIONS[4:]]
    assert texts_seen_by_all_three(csv_path, tmp_path) == dict.fromkeys(
        ["training", "filter_data", "download_image"], expected
    )


def test_a_quoted_value_over_many_lines_is_refused(tmp_path):
    caption = '"' + "\n".join(["一行"] * (MAX_RECORD_LINES + 1)) + '"'
    csv_path = write_lines(tmp_path / "train.csv", ten_rows([caption, *CAPTIONS[1:]]))
    table = CsvTable.open(csv_path, ["text"])
    with pytest.raises(InputError, match=rf"opened on line 2 runs over {MAX_RECORD_LINES + 1} lines"):
        table.count()


def test_a_row_with_more_values_than_the_header_is_refused_naming_its_line(tmp_path):
    csv_path = write_lines(tmp_path / "train.csv", [*ten_rows()[:3], "一只猫,很可爱,ftp://x/1.jpg,1.jpg"])
    with pytest.raises(InputError, match="line 4 has 4 values, the header 3"):
        CsvTable.open(csv_path, ["text"]).count()


def test_a_short_row_is_padded_with_empty_values(tmp_path):
    csv_path = write_lines(tmp_path / "train.csv", ["text,url,filename", "一只猫,ftp://x/1.jpg"])
    assert list(CsvTable.open(csv_path, ["text"]).rows()) == [
        {"text": "一只猫", "url": "ftp://x/1.jpg", "filename": ""}
    ]


# --- encodings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gbk", "gb18030"])
def test_a_gbk_or_gb18030_file_is_read_by_all_three(tmp_path, capsys, caplog, encoding):
    texts = [*CAPTIONS[:9], "表情😀，GB18030 才有" if encoding == "gb18030" else "繁體：貓"]
    csv_path = write_lines(tmp_path / "train.csv", ten_rows(texts), encoding)
    with caplog.at_level(logging.WARNING):
        seen = texts_seen_by_all_three(csv_path, tmp_path)
    assert seen == dict.fromkeys(["training", "filter_data", "download_image"], texts)
    assert capsys.readouterr().err.count("not UTF-8, read as GB18030") == 2  # one line per script
    assert "not UTF-8, read as GB18030" in caplog.text


def test_a_named_encoding_is_used_without_a_note(tmp_path, capsys):
    csv_path = write_lines(tmp_path / "train.csv", ten_rows(), "gbk")
    seen = texts_seen_by_all_three(csv_path, tmp_path, "--encoding", "gbk")
    assert seen["training"] == seen["filter_data"] == seen["download_image"] == CAPTIONS
    assert "read as" not in capsys.readouterr().err


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["no_bom", "bom"])
def test_utf8_with_or_without_a_bom_is_read(tmp_path, bom):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(bom + "text,filename\n一只猫,1.jpg\n".encode())
    table = CsvTable.open(csv_path, ["text", "filename"])
    assert table.fieldnames == ["text", "filename"] and table.encoding_note() is None


def test_a_wrong_named_encoding_fails_naming_the_line(tmp_path):
    csv_path = write_lines(tmp_path / "train.csv", ["text,filename", "cat,1.jpg", "第一张,2.jpg"], "gbk")
    with pytest.raises(InputError, match="not valid utf-8 at line 3"):
        CsvTable.open(csv_path, ["text"], encoding="utf-8")
    with pytest.raises(InputError, match="unknown encoding 'gbkk'"):
        CsvTable.open(csv_path, ["text"], encoding="gbkk")


def test_a_file_in_neither_encoding_is_refused_saying_how_to_name_one(tmp_path, capsys):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"text,url,filename\n\xff\xff,ftp://x,1.jpg\n")
    with pytest.raises(DataError, match="neither UTF-8 nor GB18030"):
        read_image_text_csv(csv_path)
    assert run_filter(csv_path, tmp_path) == 2
    assert "--encoding" in capsys.readouterr().err


# --- the header -----------------------------------------------------------------------------------


def test_header_names_differing_in_case_or_spaces_are_accepted_by_all_three(tmp_path):
    lines = ["Text, URL , Filename, Source "] + [
        f"{text},ftp://x/{i},{i}.jpg,s{i}" for i, text in enumerate(CAPTIONS)
    ]
    csv_path = write_lines(tmp_path / "train.csv", lines)
    seen = texts_seen_by_all_three(csv_path, tmp_path)
    assert seen == dict.fromkeys(["training", "filter_data", "download_image"], CAPTIONS)
    with open(tmp_path / "kept.rejected.csv", newline="", encoding="utf-8") as file:
        assert next(csv.reader(file)) == ["text", "url", "filename", " Source ", "reason"]


def test_two_columns_that_normalize_to_one_name_are_refused(tmp_path):
    csv_path = write_lines(tmp_path / "train.csv", ["text,Text,filename", "a,b,1.jpg"])
    with pytest.raises(InputError, match="more than one column is named text"):
        CsvTable.open(csv_path, ["text", "filename"])


def test_a_missing_column_is_named(tmp_path):
    csv_path = write_lines(tmp_path / "train.csv", ["caption,filename", "a,1.jpg"])
    with pytest.raises(InputError, match=r"missing column\(s\) \['text'\]"):
        CsvTable.open(csv_path, ["text", "filename"])


# --- the packed columns -------------------------------------------------------------------------


def test_columns_packed_from_pairs_equal_columns_built_from_lists():
    pairs = [("左上角有一个红色的圆形", "a.jpg"), ("", "b.jpg"), ("😀 emoji", "子目录/c.jpg")]
    texts, filenames = StringColumn.pack_pairs(iter(pairs))
    for packed, built in (
        (texts, StringColumn([t for t, _ in pairs])),
        (filenames, StringColumn([f for _, f in pairs])),
    ):
        assert packed.tolist() == built.tolist()
        assert packed.buffer.tobytes() == built.buffer.tobytes()
        assert packed.offsets.tolist() == built.offsets.tolist()
