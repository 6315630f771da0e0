"""retrieval.py on a tiny checkpoint: search against brute force, incremental and refused re-indexing,
unreadable images, atomic updates, the web API, and the benchmark's quick mode."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from _service import fetch, limits, service_module, serving
from PIL import Image, ImageFile

import retrieval
from benchmarks import bench_retrieval
from component.cli import list_images
from component.encoding import encode_images, encode_texts, load_model_and_processor
from component.errors import InputError
from component.retrieval import images as retrieval_images
from component.retrieval import index as retrieval_component
from component.retrieval import served_images as retrieval_served_images
from component.retrieval import store as retrieval_store
from component.retrieval.index import RetrievalIndex
from component.retrieval.served_index import ServedIndex
from component.retrieval.store import LOCK_FILE, index_lock, read_info
from component.testing.tiny import write_bert_clip
from datatools.atomic import write_json_atomic

QUERIES = ["一只猫", "红色的汽车停在路边", "蓝天白云"]


def draw_images(directory: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Distinct images (random colour blocks of various sizes), one per name, as PNG or JPEG by suffix."""
    paths = []
    for number, name in enumerate(names):
        rng = np.random.default_rng(seed * 1000 + number)
        blocks = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        width, height = 40 + 7 * (number % 4), 32 + 5 * (number % 3)
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST).save(path)
        paths.append(path)
    return paths


IMAGE_NAMES = ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "more/f.png", "more/g.jpg", "长城.png"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Eight images, two in a subdirectory, one with a Chinese file name."""
    directory = tmp_path_factory.mktemp("collection")
    draw_images(directory, IMAGE_NAMES)
    return directory


@pytest.fixture(scope="module")
def built_index(tiny_checkpoint, collection, tmp_path_factory) -> Path:
    """The index of `collection`, made once by the index command."""
    output = tmp_path_factory.mktemp("index") / "index"
    retrieval.main(index_argv(tiny_checkpoint, output, "--images_dir", collection, "--batch_size", 3))
    return output


@pytest.fixture(scope="module")
def other_checkpoint(tiny_towers, tmp_path_factory) -> Path:
    """Another BertCLIP model from the same towers (different random projections)."""
    torch.manual_seed(1)
    return write_bert_clip(
        tmp_path_factory.mktemp("other_bert_clip"), tiny_towers["clip"], tiny_towers["bert"]
    )


def index_argv(checkpoint: Path, output: Path, *options) -> list[str]:
    """The index command's arguments: model, output, CPU and `options`."""
    argv = ["index", "--model_name_or_path", checkpoint, "--output", output, "--device", "cpu", *options]
    return [str(argument) for argument in argv]


def run_index(checkpoint: Path, images_dir: Path, output: Path, *options) -> None:
    retrieval.main(index_argv(checkpoint, output, "--images_dir", images_dir, *options))


def search_json(capsys, index: Path, *query: str) -> dict:
    capsys.readouterr()  # drop earlier output
    retrieval.main(["search", "--index", str(index), *query, "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out)


def run_error(capsys, argv: list[str]) -> str:
    """Run a command that must fail; its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        retrieval.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


def stored(index: Path) -> tuple[list[str], np.ndarray]:
    """The filenames and embeddings (as float32) an index holds, row by row."""
    info = read_info(index)
    filenames = (index / info.files["metadata"]).read_text(encoding="utf-8").splitlines()[1:]
    return filenames, np.load(index / info.files["embeddings"]).astype(np.float32)


def brute_force(index: Path, query_embed: torch.Tensor) -> list[tuple[str, float]]:
    """Every stored image ranked by cosine with the query, computed with numpy."""
    filenames, embeddings = stored(index)
    scores = embeddings @ query_embed.numpy()
    order = np.argsort(-scores, kind="stable")
    return [(filenames[row], float(scores[row])) for row in order]


def assert_same_ranking(document: dict, expected: list[tuple[str, float]]) -> None:
    assert [result["filename"] for result in document["results"]] == [name for name, _ in expected]
    np.testing.assert_allclose(
        [result["score"] for result in document["results"]], [score for _, score in expected], atol=1e-5
    )


@pytest.mark.parametrize("query", QUERIES)
def test_text_search_equals_brute_force_ranking(capsys, built_index, tiny_checkpoint, query):
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    expected = brute_force(built_index, encode_texts(model, processor, [query])[0])
    document = search_json(capsys, built_index, "--text", query, "--top_k", str(len(IMAGE_NAMES)))
    assert document["query"] == query
    assert_same_ranking(document, expected)


def test_image_search_equals_brute_force_ranking_and_finds_the_image_itself(
    capsys, built_index, collection, tiny_checkpoint
):
    query = collection / "more" / "f.png"
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    expected = brute_force(built_index, encode_images(model, processor, [query])[0])
    document = search_json(capsys, built_index, "--image", str(query), "--top_k", "3")
    assert document["query"] == str(query)
    assert_same_ranking(document, expected[:3])
    assert document["results"][0]["filename"] == "more/f.png"
    assert document["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)  # float16 storage


def test_stored_embeddings_are_the_shared_helpers_normalised(built_index, collection, tiny_checkpoint):
    filenames, embeddings = stored(built_index)
    assert sorted(filenames) == sorted(IMAGE_NAMES)
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    expected = encode_images(model, processor, [collection / name for name in filenames]).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=2e-3)


def test_index_records_the_model_and_an_exact_index(built_index, tiny_checkpoint, collection):
    info = read_info(built_index)
    assert info.model_name_or_path == str(tiny_checkpoint)
    assert info.image_root == str(collection)
    assert (info.index_type, info.dtype, info.count) == ("exact", "float16", len(IMAGE_NAMES))
    assert len(info.model_fingerprint) == 64


def test_plain_search_prints_ranked_lines(capsys, built_index):
    retrieval.main(
        ["search", "--index", str(built_index), "--text", "一只猫", "--top_k", "2", "--device", "cpu"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] == "1." and lines[1].split()[0] == "2."
    assert float(lines[0].split()[1]) >= float(lines[1].split()[1])


def test_python_api_equals_the_search_command(capsys, built_index):
    index = RetrievalIndex.load(built_index, device="cpu")
    results = index.search_text("蓝天白云", top_k=4)
    document = search_json(capsys, built_index, "--text", "蓝天白云", "--top_k", "4")
    assert [result.to_dict() for result in results] == document["results"]


def test_reindex_of_a_grown_folder_encodes_only_the_new_images(
    tmp_path, tiny_checkpoint, collection, monkeypatch, capsys
):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    run_index(tiny_checkpoint, images, tmp_path / "index")
    before_names, before_embeddings = stored(tmp_path / "index")
    draw_images(images, ["new/h.png", "i.jpg"], seed=1)
    encoded = []

    def counting_encode_images(model, processor, images, **options):
        encoded.extend(images)
        return encode_images(model, processor, images, **options)

    monkeypatch.setattr(retrieval_images, "encode_images", counting_encode_images)
    capsys.readouterr()
    run_index(tiny_checkpoint, images, tmp_path / "index")
    assert len(encoded) == 2
    assert "indexed 2 new image(s); 8 already indexed, 0 removed, 0 unreadable" in capsys.readouterr().out
    names, embeddings = stored(tmp_path / "index")
    assert names == [*before_names, "i.jpg", "new/h.png"]
    np.testing.assert_array_equal(embeddings[: len(before_names)], before_embeddings)
    monkeypatch.undo()
    run_index(tiny_checkpoint, images, tmp_path / "fresh")
    fresh_names, fresh_embeddings = stored(tmp_path / "fresh")
    order = [fresh_names.index(name) for name in names]
    np.testing.assert_allclose(embeddings, fresh_embeddings[order], atol=1e-3)


def test_reindex_drops_images_no_longer_in_the_folder(capsys, tmp_path, tiny_checkpoint, collection):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    run_index(tiny_checkpoint, images, tmp_path / "index")
    (images / "b.jpg").unlink()
    run_index(tiny_checkpoint, images, tmp_path / "index")
    assert "0 new image(s); 7 already indexed, 1 removed" in capsys.readouterr().out
    names, _ = stored(tmp_path / "index")
    assert "b.jpg" not in names and len(names) == 7
    document = search_json(capsys, tmp_path / "index", "--text", "一只猫", "--top_k", "10")
    assert len(document["results"]) == 7
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == [
        ".index.lock",
        "embeddings-000002.npy",
        "index.json",
        "metadata-000002.csv",
        "vectors-000002.faiss",
    ]


def test_index_with_another_model_is_refused(capsys, built_index, other_checkpoint, collection):
    info_before = (built_index / "index.json").read_text()
    error = run_error(capsys, index_argv(other_checkpoint, built_index, "--images_dir", collection))
    assert error.startswith(f"error: {built_index} was built with the model")
    assert "this model differs" in error and "new --output" in error
    assert (built_index / "index.json").read_text() == info_before


def test_search_with_another_model_is_refused(capsys, built_index, other_checkpoint):
    error = run_error(
        capsys,
        [
            "search",
            "--index",
            str(built_index),
            "--text",
            "猫",
            "--model_name_or_path",
            str(other_checkpoint),
        ],
    )
    assert "is not the model that built" in error


def test_unreadable_images_are_skipped_and_listed(capsys, tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    draw_images(images, ["good.png", "fine.jpg"])
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    (images / "cut.png").write_bytes((images / "good.png").read_bytes()[:60])
    run_index(tiny_checkpoint, images, tmp_path / "index")
    captured = capsys.readouterr()
    assert "2 new image(s); 0 already indexed, 0 removed, 2 unreadable" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped unreadable image")]
    assert sorted(line.split()[3] for line in skipped) == ["broken.jpg:", "cut.png:"]
    unreadable = read_info(tmp_path / "index").last_run["unreadable"]
    assert sorted(image["filename"] for image in unreadable) == ["broken.jpg", "cut.png"]
    assert sorted(stored(tmp_path / "index")[0]) == ["fine.jpg", "good.png"]


def run_in_thread(run, seconds: float = 60) -> None:
    """Run `run` in a thread and fail, rather than hang, when it has not ended after `seconds`."""
    errors = []

    def target():
        try:
            run()
        except BaseException as error:  # SystemExit included: report it to the test
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]


@pytest.fixture
def folder_with_a_fifo(tmp_path) -> Path:
    """Two images, a FIFO and a directory named like images; the FIFO is released after the test."""
    images = tmp_path / "images"
    draw_images(images, ["good.png", "fine.jpg"])
    os.mkfifo(images / "pipe.jpg")
    (images / "folder.png").mkdir()
    yield images
    try:  # a reader still blocked on the FIFO gets end of file
        os.close(os.open(images / "pipe.jpg", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader: nothing blocked


def test_a_folder_lists_only_regular_files(folder_with_a_fifo):
    assert [path.name for path in list_images(folder_with_a_fifo)] == ["fine.jpg", "good.png"]


def test_a_fifo_in_the_folder_does_not_hang_indexing(capsys, tmp_path, tiny_checkpoint, folder_with_a_fifo):
    run_in_thread(lambda: run_index(tiny_checkpoint, folder_with_a_fifo, tmp_path / "index"))
    assert "2 new image(s); 0 already indexed, 0 removed, 0 unreadable" in capsys.readouterr().out
    assert sorted(stored(tmp_path / "index")[0]) == ["fine.jpg", "good.png"]


def test_a_fifo_named_in_a_csv_is_skipped_as_unreadable(
    capsys, tmp_path, tiny_checkpoint, folder_with_a_fifo
):
    (tmp_path / "pairs.csv").write_text("text,filename\n一只猫,good.png\n管道,pipe.jpg\n", encoding="utf-8")
    options = ["--input", tmp_path / "pairs.csv", "--image_path", folder_with_a_fifo]
    run_in_thread(lambda: retrieval.main(index_argv(tiny_checkpoint, tmp_path / "index", *options)))
    captured = capsys.readouterr()
    assert "1 new image(s); 0 already indexed, 0 removed, 1 unreadable" in captured.out
    assert "skipped unreadable image pipe.jpg: RejectedError: not_a_file:" in captured.err


def test_csv_names_that_escape_image_path_are_skipped_unread(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 30), "red").save(tmp_path / "images" / "good.png")
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "secret.png")  # outside image_path
    (tmp_path / "pairs.csv").write_text(
        f"text,filename\n一只猫,good.png\n越界,../secret.png\n绝对,{tmp_path / 'secret.png'}\n",
        encoding="utf-8",
    )
    options = ["--input", tmp_path / "pairs.csv", "--image_path", tmp_path / "images"]
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "index", *options))
    captured = capsys.readouterr()
    assert "1 new image(s); 0 already indexed, 0 removed, 2 unreadable" in captured.out
    assert captured.err.count("unsafe_filename") == 2


def test_a_folder_of_only_unreadable_images_is_an_error(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a PNG")
    error = run_error(
        capsys, index_argv(tiny_checkpoint, tmp_path / "index", "--images_dir", tmp_path / "images")
    )
    assert "no readable images" in error
    assert not (tmp_path / "index" / "index.json").exists()


def test_csv_index_keeps_each_images_first_text(capsys, tmp_path, tiny_checkpoint, collection):
    rows = [
        "text,filename",
        "一只猫,a.png",
        "另一只猫,a.png",
        "红色的汽车,more/f.png",
        "丢失的图片,missing.png",
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    csv_options = ["--input", tmp_path / "pairs.csv", "--image_path", collection]
    retrieval.main(index_argv(tiny_checkpoint, tmp_path / "index", *csv_options))
    assert "2 new image(s); 0 already indexed, 0 removed, 1 unreadable" in capsys.readouterr().out
    document = search_json(capsys, tmp_path / "index", "--text", "猫", "--top_k", "5")
    texts = {result["filename"]: result["text"] for result in document["results"]}
    assert texts == {"a.png": "一只猫", "more/f.png": "红色的汽车"}


def test_float32_storage_keeps_the_encoded_values(tmp_path, tiny_checkpoint, collection):
    run_index(tiny_checkpoint, collection, tmp_path / "index", "--dtype", "float32")
    filenames, embeddings = stored(tmp_path / "index")
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    expected = encode_images(model, processor, [collection / name for name in filenames]).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)  # float16 storage differs by up to 1e-3


def test_approximate_index_on_a_small_set_ranks_like_the_exact_one(
    capsys, tmp_path, tiny_checkpoint, built_index
):
    info = read_info(built_index)
    run_index(tiny_checkpoint, Path(info.image_root), tmp_path / "index", "--index_type", "approximate")
    assert read_info(tmp_path / "index").index_type == "approximate"
    approximate = search_json(capsys, tmp_path / "index", "--text", "一只猫", "--top_k", "5")
    exact = search_json(capsys, built_index, "--text", "一只猫", "--top_k", "5")
    assert [r["filename"] for r in approximate["results"]] == [r["filename"] for r in exact["results"]]


def test_interrupted_update_leaves_the_previous_index_whole(
    capsys, tmp_path, tiny_checkpoint, collection, monkeypatch
):
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    run_index(tiny_checkpoint, images, tmp_path / "index")
    before = search_json(capsys, tmp_path / "index", "--text", "一只猫", "--top_k", "20")
    draw_images(images, ["late.png"], seed=2)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval_component, "write_info", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_index(tiny_checkpoint, images, tmp_path / "index")
    assert search_json(capsys, tmp_path / "index", "--text", "一只猫", "--top_k", "20") == before
    monkeypatch.undo()
    run_index(tiny_checkpoint, images, tmp_path / "index")
    assert "indexed 1 new image(s); 8 already indexed" in capsys.readouterr().out
    assert len(list((tmp_path / "index").iterdir())) == 5  # the interrupted run's files are gone


def test_an_interrupted_first_run_leaves_a_directory_the_next_run_reuses(
    capsys, tmp_path, tiny_checkpoint, collection, monkeypatch
):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval_component, "write_info", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_index(tiny_checkpoint, collection, tmp_path / "index")
    assert (tmp_path / "index" / "embeddings-000001.npy").exists()
    assert not (tmp_path / "index" / "index.json").exists()
    monkeypatch.undo()
    run_index(tiny_checkpoint, collection, tmp_path / "index")
    assert f"indexed {len(IMAGE_NAMES)} new image(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "index").iterdir())) == 5


# --- one index run at a time ---


def test_an_index_run_into_a_locked_directory_fails_before_loading_the_model(
    capsys, tmp_path, tiny_checkpoint, collection, monkeypatch
):
    run_index(tiny_checkpoint, collection, tmp_path / "index")
    info_before = (tmp_path / "index" / "index.json").read_text()

    def no_model(*args, **options):
        raise AssertionError("the model was loaded before the lock was taken")

    monkeypatch.setattr(retrieval_component, "load_model_and_processor", no_model)
    with index_lock(tmp_path / "index"):
        error = run_error(capsys, index_argv(tiny_checkpoint, tmp_path / "index", "--images_dir", collection))
    assert error.startswith(f"error: {tmp_path / 'index'}: another index run is in progress")
    assert (tmp_path / "index" / "index.json").read_text() == info_before


def test_a_second_index_run_is_refused_while_the_first_completes(
    capsys, tmp_path, tiny_checkpoint, collection, monkeypatch
):
    encoding, finish = threading.Event(), threading.Event()
    first_run_errors = []

    def paused_encode_images(*args, **options):
        if threading.current_thread() is first:  # without the lock, the second run must not wait
            encoding.set()
            assert finish.wait(60)
        return encode_images(*args, **options)

    def first_run():
        try:
            run_index(tiny_checkpoint, collection, tmp_path / "index", "--batch_size", "8")
        except BaseException as error:
            first_run_errors.append(error)

    monkeypatch.setattr(retrieval_images, "encode_images", paused_encode_images)
    first = threading.Thread(target=first_run)
    first.start()
    try:
        assert encoding.wait(60)
        argv = index_argv(tiny_checkpoint, tmp_path / "index", "--images_dir", collection)
        error = run_error(capsys, argv)  # the new directory holds only the first run's files
    finally:
        finish.set()
        first.join(60)
    # the first run's progress bar may share the error's line
    assert f"error: {tmp_path / 'index'}: another index run is in progress" in error
    assert first_run_errors == []
    assert "indexed 8 new image(s)" in capsys.readouterr().out
    assert read_info(tmp_path / "index").count == len(IMAGE_NAMES)


def test_a_lock_file_left_by_a_killed_index_run_blocks_no_later_run(
    capsys, tmp_path, tiny_checkpoint, collection
):
    (tmp_path / "index").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "index" / LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays
    finally:
        holder.wait(30)
    assert (tmp_path / "index" / LOCK_FILE).exists()
    run_index(tiny_checkpoint, collection, tmp_path / "index")
    assert f"indexed {len(IMAGE_NAMES)} new image(s)" in capsys.readouterr().out


LOCK_HOLDER = """
import fcntl, sys, time
lock_file = open(sys.argv[1], "a")
fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{tmp}/none", "--text", "猫"], "not a retrieval index"),
        (["serve", "--index", "{tmp}/none"], "not a retrieval index"),
        (["search", "--index", "{index}", "--image", "{tmp}/none.png"], "no such image file"),
        (["search", "--index", "{index}", "--text", "  "], "the query text is empty"),
        (
            ["index", "--model_name_or_path", "{model}", "--input", "{tmp}/x.csv", "--output", "{tmp}/i"],
            "--image_path",
        ),
        (
            ["index", "--model_name_or_path", "{model}", "--images_dir", "{tmp}/none", "--output", "{tmp}/i"],
            "no such",
        ),
        (
            ["index", "--model_name_or_path", "{model}", "--images_dir", "{images}", "--output", "{images}"],
            "not a retrieval index",
        ),
        (
            ["index", "--model_name_or_path", "{tmp}", "--images_dir", "{images}", "--output", "{tmp}/i"],
            "config.json",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors(
    capsys, tmp_path, built_index, tiny_checkpoint, collection, argv, message
):
    values = dict(tmp=tmp_path, index=built_index, model=tiny_checkpoint, images=collection)
    error = run_error(capsys, [argument.format(**values) for argument in argv] + ["--device", "cpu"])
    assert error.startswith("error: ") and message in error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "a JSON list, not an object"),
        ("null", "a JSON NoneType, not an object"),
        ("{", "Expecting property name"),
        ('{"format_version": 2}', "format version 2"),
        ("files=null", "files is None"),  # a field of the right name with a value of the wrong type
    ],
)
def test_a_damaged_index_json_is_a_one_line_error(capsys, tmp_path, built_index, content, message):
    shutil.copytree(built_index, tmp_path / "index")
    info_path = tmp_path / "index" / "index.json"
    if content == "files=null":
        content = json.dumps({**json.loads(info_path.read_text(encoding="utf-8")), "files": None})
    info_path.write_text(content, encoding="utf-8")
    error = run_error(capsys, ["search", "--index", str(tmp_path / "index"), "--text", "猫"])
    assert error.startswith(f"error: {info_path}: not a usable index description") and message in error


def test_a_load_that_an_index_run_overtakes_reads_the_new_index(
    monkeypatch, tmp_path, tiny_checkpoint, grown_images
):
    # The run replaces index.json and deletes the data files of the one already read.
    draw_images(grown_images, ["new/h.png", "i.jpg"], seed=1)
    original_read_data_files = retrieval_store.read_data_files
    overtaken = []

    def overtaken_read_data_files(directory, info):
        if not overtaken:
            overtaken.append(info.generation)
            run_index(tiny_checkpoint, grown_images, directory)
        return original_read_data_files(directory, info)

    monkeypatch.setattr(retrieval_store, "read_data_files", overtaken_read_data_files)
    index = RetrievalIndex.load(tmp_path / "index")
    assert overtaken == [1] and (index.info.generation, len(index)) == (2, len(IMAGE_NAMES) + 2)


def test_an_index_with_a_missing_data_file_is_an_error(capsys, tmp_path, built_index):
    shutil.copytree(built_index, tmp_path / "index")
    (tmp_path / "index" / read_info(tmp_path / "index").files["metadata"]).unlink()
    error = run_error(capsys, ["search", "--index", str(tmp_path / "index"), "--text", "猫"])
    assert "the index files are missing or damaged" in error


# --- the web API ---


@pytest.fixture(scope="module")
def server(built_index):
    """The search service for `built_index`."""
    with serving(built_index) as server:
        yield server


def test_api_text_search_equals_the_search_command(capsys, server, built_index):
    status, body, content_type = fetch(server, "/api/search?top_k=5&q=" + quote("红色的汽车停在路边"))
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == search_json(
        capsys, built_index, "--text", "红色的汽车停在路边", "--top_k", "5"
    )


def test_api_image_upload_search_finds_the_image(server, collection):
    status, body, _ = fetch(server, "/api/search_image?top_k=2", (collection / "d.jpg").read_bytes())
    assert status == 200
    assert json.loads(body)["results"][0]["filename"] == "d.jpg"


def test_page_and_images_are_served(server, collection):
    status, page, content_type = fetch(server, "/")
    assert status == 200 and content_type.startswith("text/html") and b'id="query"' in page
    status, body, content_type = fetch(server, "/image?path=" + quote("长城.png"))
    assert (status, content_type, body) == (200, "image/png", (collection / "长城.png").read_bytes())
    status, body, content_type = fetch(server, "/thumbnail?path=" + quote("more/g.jpg"))
    assert (status, content_type) == (200, "image/jpeg")
    assert max(Image.open(io.BytesIO(body)).size) <= 256


@pytest.mark.parametrize(
    "path", ["../outside.png", "/etc/passwd", "more/../a.png", "missing.png", "", "%2e%2e/outside.png"]
)
def test_only_indexed_images_inside_the_folder_are_served(server, collection, path):
    (collection.parent / "outside.png").write_bytes((collection / "a.png").read_bytes())
    for route in ("/image", "/thumbnail"):
        status, body, _ = fetch(server, f"{route}?path={quote(path, safe='%')}")
        assert status == 404 and "not an indexed image" in json.loads(body)["error"]


def test_a_symbolic_link_out_of_the_folder_is_indexed_but_not_served(tmp_path, tiny_checkpoint):
    draw_images(tmp_path, ["images/inside.png", "secret.png"])
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    run_index(tiny_checkpoint, tmp_path / "images", tmp_path / "index")
    served = ServedIndex.of(RetrievalIndex.load(tmp_path / "index"))
    assert sorted(served.filenames) == ["inside.png", "link.png"]
    assert served.indexed_file("inside.png") == (tmp_path / "images" / "inside.png").resolve()
    assert served.indexed_file("link.png") is None


@pytest.fixture(scope="module")
def small_upload_server(built_index):
    """The service with its upload cap lowered to 1,000 bytes."""
    with serving(built_index, limits=limits(max_upload_bytes=1000)) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/search?q=" + quote("猫") + "&top_k=0", None, 422),
        ("/api/search?q=" + quote("猫") + "&top_k=many", None, 422),
        ("/api/search?q=", None, 422),
        ("/api/search?q=%20", None, 400),
        ("/api/search_image", b"not an image", 400),
        ("/api/search_image", b"x" * 1001, 413),  # the cap is lowered to 1,000 bytes
        ("/nothing", None, 404),
    ],
)
def test_bad_api_requests_get_json_errors(small_upload_server, path, body, status):
    got_status, got_body, content_type = fetch(small_upload_server, path, body)
    assert (got_status, content_type) == (status, "application/json")
    assert json.loads(got_body)["error"]


def large_png(side: int = 12_000) -> bytes:
    """A PNG of side x side black pixels, 1 bit each, in under 20 KB: built by hand, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"\0" * (1 + (side + 7) // 8) * side  # each row: filter type 0, then its packed bits
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    idat = zlib.compress(rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding any image's pixels fail the test."""

    def load(image):
        raise AssertionError(f"decoded a {image.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


TOO_LARGE = f"image too large: 12000 x 12000 pixels, the limit is {retrieval_served_images.MAX_PIXELS}"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_upload_of_too_many_pixels_is_refused_undecoded(server, no_decoding):
    status, body, content_type = fetch(server, "/api/search_image", large_png())
    assert (status, content_type) == (400, "application/json")
    assert json.loads(body)["error"] == TOO_LARGE


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_indexed_image_of_too_many_pixels_gets_no_thumbnail(tmp_path, grown_images, no_decoding):
    (grown_images / "a.png").write_bytes(large_png())  # replaced after the index run
    with serving(tmp_path / "index") as server:
        status, body, content_type = fetch(server, "/thumbnail?path=a.png")
        assert (status, content_type) == (404, "application/json")
        assert json.loads(body)["error"] == f"cannot make a thumbnail of 'a.png' ({TOO_LARGE})"
        assert fetch(server, "/image?path=a.png")[:2] == (200, large_png())


def test_a_jpeg_counts_its_pixels_at_the_scale_its_thumbnail_decodes_at(tmp_path):
    image = Image.new("RGB", (2400, 1800), "red")  # 4.3 M pixels; at 1/4 scale 600 x 450
    image.save(tmp_path / "large.jpg")
    image.save(tmp_path / "large.png")
    thumbnail = retrieval_served_images.make_thumbnail(tmp_path / "large.jpg", max_pixels=300_000)
    assert Image.open(io.BytesIO(thumbnail)).size == (256, 192)
    with pytest.raises(InputError, match="image too large: 2400 x 1800 pixels, the limit is 300000"):
        retrieval_served_images.make_thumbnail(tmp_path / "large.png", max_pixels=300_000)


def test_uploads_are_decoded_and_searched_two_at_a_time(server, monkeypatch):
    decoding, most = [], []
    lock = threading.Lock()

    def slow_read_uploaded_image(body):
        with lock:
            decoding.append(body)
            most.append(len(decoding))
        time.sleep(0.3)
        with lock:
            decoding.remove(body)
        raise InputError("not searched")

    retrieval_service = service_module()
    monkeypatch.setattr(retrieval_service, "read_uploaded_image", slow_read_uploaded_image)
    statuses = []
    uploads = [
        threading.Thread(target=lambda: statuses.append(fetch(server, "/api/search_image", b"x")[0]))
        for _ in range(5)
    ]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(60)
    assert statuses == [400] * 5 and max(most) == retrieval_service.IMAGES_DECODED_AT_ONCE


# --- the server after a later index run ---


def api_filenames(server, text: str = "一只猫", top_k: int = 20) -> list[str]:
    """The filenames the text search API ranks, best first."""
    status, body, _ = fetch(server, f"/api/search?top_k={top_k}&q=" + quote(text))
    assert status == 200
    return [result["filename"] for result in json.loads(body)["results"]]


@pytest.fixture
def grown_images(tmp_path, tiny_checkpoint, collection) -> Path:
    """A copy of `collection` indexed into tmp_path/index; the test may add images to it."""
    images = tmp_path / "images"
    shutil.copytree(collection, images)
    run_index(tiny_checkpoint, images, tmp_path / "index")
    return images


def test_the_server_searches_a_later_index_run_without_a_restart(
    capsys, tmp_path, tiny_checkpoint, grown_images
):
    with serving(tmp_path / "index") as server:
        assert sorted(api_filenames(server)) == sorted(IMAGE_NAMES)
        draw_images(grown_images, ["new/h.png", "i.jpg"], seed=1)
        run_index(tiny_checkpoint, grown_images, tmp_path / "index")
        found = api_filenames(server)
        _, body, _ = fetch(server, "/api/search_image?top_k=1", (grown_images / "i.jpg").read_bytes())
        assert json.loads(body)["results"][0]["filename"] == "i.jpg"
        assert fetch(server, "/image?path=" + quote("new/h.png"))[0] == 200
        assert b"10 images indexed" in fetch(server, "/")[1]
    assert sorted(found) == sorted([*IMAGE_NAMES, "new/h.png", "i.jpg"])
    assert f"reloaded {tmp_path / 'index'}: 10 images, generation 2" in capsys.readouterr().err
    document = search_json(capsys, tmp_path / "index", "--text", "一只猫", "--top_k", "20")
    assert found == [result["filename"] for result in document["results"]]


def test_a_failed_reload_keeps_serving_the_old_index_and_says_why(capsys, tmp_path, grown_images):
    info_path = tmp_path / "index" / "index.json"
    good_info = json.loads(info_path.read_text(encoding="utf-8"))
    with serving(tmp_path / "index") as server:
        before = api_filenames(server)
        write_json_atomic(info_path, {**good_info, "format_version": 99})
        capsys.readouterr()
        assert api_filenames(server) == before
        assert "warning: cannot reload" in capsys.readouterr().err
        assert api_filenames(server) == before
        assert "cannot reload" not in capsys.readouterr().err  # tried once per index.json, not per request
        write_json_atomic(info_path, good_info)
        assert api_filenames(server) == before
    error = capsys.readouterr().err
    assert "reloaded" in error and "cannot reload" not in error


def test_an_index_rebuilt_by_another_model_is_not_swapped_in(
    capsys, tmp_path, tiny_checkpoint, other_checkpoint, grown_images
):
    with serving(tmp_path / "index") as server:
        before = api_filenames(server)
        shutil.rmtree(tmp_path / "index")
        (grown_images / "a.png").unlink()
        run_index(other_checkpoint, grown_images, tmp_path / "index")
        capsys.readouterr()
        assert api_filenames(server) == before  # the old files are gone, but still mapped
    error = capsys.readouterr().err
    assert "cannot reload" in error and "rebuilt with another model" in error
    assert f"still serving its {len(IMAGE_NAMES)} images of generation 1" in error


def test_searches_during_an_index_run_are_all_answered(tmp_path, tiny_checkpoint, grown_images):
    answers, stop = [], threading.Event()

    def search_repeatedly(server):
        while not stop.is_set():
            answers.append(len(api_filenames(server)))

    with serving(tmp_path / "index") as server:
        searchers = [threading.Thread(target=search_repeatedly, args=(server,)) for _ in range(3)]
        for searcher in searchers:
            searcher.start()
        draw_images(grown_images, ["new/h.png", "i.jpg"], seed=1)
        try:
            run_index(tiny_checkpoint, grown_images, tmp_path / "index")
        finally:
            stop.set()
            for searcher in searchers:
                searcher.join(60)
        assert len(api_filenames(server)) == len(IMAGE_NAMES) + 2
    assert answers and set(answers) <= {len(IMAGE_NAMES), len(IMAGE_NAMES) + 2}


# --- the benchmark ---


def test_benchmark_quick_mode_runs(tmp_path, capsys):
    assert bench_retrieval.main(["--quick", "--workdir", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["indexing"]["cpu"]["images_per_s"] > 0
    assert {row["vectors"] for row in figures["query_latency"]} == set(bench_retrieval.QUICK_VECTOR_COUNTS)
