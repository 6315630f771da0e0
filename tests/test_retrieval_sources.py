"""retrieval.py index --input on data that holds its images: webdataset shards and Chinese-CLIP's
tsv/jsonl. Their images are written into the index directory and searched and served as files."""

import csv
import hashlib
import io
import tarfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from _service import fetch, serving
from _shards import add_member, write_img2dataset_shards
from PIL import Image
from test_cn_clip_data import build_lmdb_with_cn_clip, needs_cn_clip, needs_lmdb, write_cn_clip_split
from test_retrieval import QUERIES, draw_images, index_argv, run_error, run_index, search_json

import retrieval
from component.retrieval import data_images
from component.retrieval.data_images import file_stem, image_file
from component.retrieval.index import RetrievalIndex

NAMES = ["a.png", "b.jpg", "c.png", "d.jpg", "e.png"]
CAPTIONS = ["一只猫", "红色的汽车", "蓝天白云", "草地上的狗", "长城"]


def stored(index: Path) -> tuple[list[str], np.ndarray]:
    """The filenames and embeddings (as float32) an index holds, row by row."""
    opened = RetrievalIndex.load(index)
    return opened.metadata["filename"].tolist(), np.asarray(opened.embeddings, dtype=np.float32)


def digest_name(path: Path) -> str:
    """The file name an index gives a shard sample's image: its key (a digest of the bytes) and suffix."""
    return hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest() + path.suffix


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> tuple[Path, Path]:
    """Two img2dataset shards of five images (three per shard), and a folder of the same images
    under the names the index gives them."""
    root = tmp_path_factory.mktemp("shard_data")
    images = draw_images(root / "originals", NAMES, seed=3)
    with open(root / "pairs.csv", "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "text"])
        writer.writerows(zip(NAMES, CAPTIONS, strict=True))
    write_img2dataset_shards(root / "pairs.csv", root / "originals", root / "shards", shard_size=3)
    folder = root / "folder"
    folder.mkdir()
    for path in images:
        (folder / digest_name(path)).write_bytes(path.read_bytes())
    return root / "shards", folder


@pytest.fixture(scope="module")
def shard_index(tiny_checkpoint, shard_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shard_index") / "index"
    retrieval.main(index_argv(tiny_checkpoint, output, "--input", shard_data[0] / "{00000..00001}.tar"))
    return output


def assert_same_results(capsys, index: Path, reference: Path, *query: str) -> None:
    found = search_json(capsys, index, *query, "--top_k", "10")["results"]
    expected = search_json(capsys, reference, *query, "--top_k", "10")["results"]
    assert [result["filename"] for result in found] == [result["filename"] for result in expected]
    assert [result["score"] for result in found] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_shards_index_like_the_same_images_as_files(
    capsys, tiny_checkpoint, shard_data, shard_index, tmp_path
):
    run_index(tiny_checkpoint, shard_data[1], tmp_path / "reference")
    names, embeddings = stored(shard_index)
    reference_names, reference_embeddings = stored(tmp_path / "reference")
    assert sorted(names) == sorted(reference_names)
    rows = [reference_names.index(name) for name in names]
    assert abs(embeddings - reference_embeddings[rows]).max() < 1e-5
    for query in QUERIES:
        assert_same_results(capsys, shard_index, tmp_path / "reference", "--text", query)
    query_image = str(shard_data[1] / digest_name(shard_data[0].parent / "originals" / "d.jpg"))
    assert_same_results(capsys, shard_index, tmp_path / "reference", "--image", query_image)


def test_shard_index_keeps_each_images_caption(capsys, shard_data, shard_index):
    results = search_json(capsys, shard_index, "--text", "一只猫", "--top_k", "10")["results"]
    originals = shard_data[0].parent / "originals"
    captions = {digest_name(originals / name): text for name, text in zip(NAMES, CAPTIONS, strict=True)}
    assert {result["filename"]: result["text"] for result in results} == captions


def test_the_server_serves_an_image_from_shards(shard_data, shard_index):
    original = shard_data[0].parent / "originals" / "b.jpg"
    with serving(shard_index) as server:
        status, body, content_type = fetch(server, "/image?path=" + quote(digest_name(original)))
        thumbnail = fetch(server, "/thumbnail?path=" + quote(digest_name(original)))
    assert (status, content_type, body) == (200, "image/jpeg", original.read_bytes())
    assert thumbnail[0] == 200 and Image.open(io.BytesIO(thumbnail[1])).format == "JPEG"


def test_a_rerun_on_the_same_shards_reads_and_encodes_nothing_new(
    capsys, monkeypatch, tiny_checkpoint, shard_data, shard_index
):
    def no_rewrite(data):
        raise AssertionError("an image already in the index was written again")

    monkeypatch.setattr(data_images, "image_file", no_rewrite)
    capsys.readouterr()
    retrieval.main(index_argv(tiny_checkpoint, shard_index, "--input", shard_data[0]))
    assert "indexed 0 new image(s); 5 already indexed, 0 removed, 0 unreadable" in capsys.readouterr().out


def test_a_corrupt_shard_sample_is_skipped_as_unreadable(capsys, tiny_checkpoint, shard_data, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = (shard_data[0].parent / "originals" / "a.png").read_bytes()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key, data in [("000000000", good), ("000000001", b"this is not a JPEG")]:
            add_member(tar, f"{key}.jpg", data)
            add_member(tar, f"{key}.txt", "一张图".encode())
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "index", "--input", shards))
    captured = capsys.readouterr()
    assert "indexed 1 new image(s); 0 already indexed, 0 removed, 1 unreadable" in captured.out
    assert f"skipped unreadable image {shards} sample 000000001: " in captured.err
    assert len(stored(tmp_path / "index")[0]) == 1


def test_image_path_with_shards_is_refused_in_one_line(capsys, tiny_checkpoint, shard_data, tmp_path):
    argv = index_argv(tiny_checkpoint, tmp_path / "index", "--input", shard_data[0], "--image_path", tmp_path)
    error = run_error(capsys, argv)
    assert error == f"error: {shard_data[0]} holds its images; --image_path goes only with a CSV --input"


def test_a_csv_still_needs_image_path(capsys, tiny_checkpoint, shard_data, tmp_path):
    argv = index_argv(tiny_checkpoint, tmp_path / "index", "--input", shard_data[0].parent / "pairs.csv")
    assert "needs --image_path" in run_error(capsys, argv)


def test_a_tsv_jsonl_split_indexes_like_its_images_as_files(capsys, tiny_checkpoint, tmp_path):
    texts = write_cn_clip_split(tmp_path / "data")
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "index", "--input", texts))
    folder = tmp_path / "index" / "images"
    assert sorted(path.name for path in folder.iterdir()) == ["1000.png", "1001.png", "1002.png"]
    reference = tmp_path / "reference_images"
    reference.mkdir()
    for path in folder.iterdir():
        (reference / path.name).write_bytes(path.read_bytes())
    run_index(tiny_checkpoint, reference, tmp_path / "reference")
    for query in QUERIES:
        assert_same_results(capsys, tmp_path / "index", tmp_path / "reference", "--text", query)


@needs_lmdb
@needs_cn_clip
def test_an_lmdb_indexes_like_its_tsv_jsonl(capsys, tiny_checkpoint, tmp_path):
    texts = write_cn_clip_split(tmp_path / "data")
    lmdb_dir = build_lmdb_with_cn_clip(texts.parent)
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "from_tsv", "--input", texts))
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "from_lmdb", "--input", lmdb_dir))
    for query in QUERIES:
        assert search_json(capsys, tmp_path / "from_lmdb", "--text", query) == search_json(
            capsys, tmp_path / "from_tsv", "--text", query
        )


def test_keys_become_safe_distinct_file_names():
    assert file_stem("1000") == "1000"
    for key in ("../../etc/passwd", "/abs", "a/b", "A", "a b", "", "."):
        stem = file_stem(key)
        assert stem and "/" not in stem and not stem.startswith(".") and stem != key
    assert len({file_stem(key) for key in ("a/b", "a_b", "a:b", "A_b")}) == 4


def test_a_format_the_page_does_not_show_is_written_as_jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (10, 200, 30)).save(buffer, "BMP")
    data, suffix = image_file(buffer.getvalue())
    assert suffix == ".jpg" and Image.open(io.BytesIO(data)).format == "JPEG"
    png = io.BytesIO()
    Image.new("RGB", (20, 16), (10, 200, 30)).save(png, "PNG")
    assert image_file(png.getvalue()) == (png.getvalue(), ".png")
