"""Webdataset shards: img2dataset's layout read, shard patterns, the stream's order and split,
fast-forward, and bad shards and samples."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _runs import write_shapes
from _shards import add_member, write_img2dataset_shards

from component.processor import ImageTransform, load_processor
from component.training.dataset import DataError
from component.training.shards import ShardStream, TarSource
from datatools.shards import ShardError, expand_braces, iter_tar_samples, list_shards, shard_sizes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shard_shapes"), train=24, seed=1)


@pytest.fixture(scope="module")
def shards(shapes) -> list[Path]:
    return write_img2dataset_shards(shapes / "train.csv", shapes / "images", shapes / "shards", shard_size=5)


@pytest.fixture(scope="module")
def transform(tiny_checkpoint) -> ImageTransform:
    return ImageTransform.from_processor(load_processor(tiny_checkpoint))


def captions_of(csv_path: Path) -> list[str]:
    return [line.split(",")[0] for line in csv_path.read_text(encoding="utf-8").splitlines()[1:]]


def test_img2dataset_layout_is_read_with_txt_or_json_captions(shapes, shards, tmp_path):
    samples = [s for shard in shards for s in iter_tar_samples(shard)]
    assert [s.caption for s in samples] == captions_of(shapes / "train.csv")
    assert samples[0].key == "000000000" and all(s.problem is None for s in samples)
    json_only = write_img2dataset_shards(
        shapes / "train.csv", shapes / "images", tmp_path, 5, caption_in_txt=False
    )
    assert [s.caption for shard in json_only for s in iter_tar_samples(shard)] == captions_of(
        shapes / "train.csv"
    )


def test_the_webdataset_package_reads_the_same_samples(shards):
    webdataset = pytest.importorskip("webdataset")
    ours = [(s.key, s.caption) for shard in shards for s in iter_tar_samples(shard)]
    theirs = [
        (s["__key__"], s["txt"].decode())
        for s in webdataset.WebDataset([str(p) for p in shards], shardshuffle=False)
    ]
    assert ours == theirs


def test_brace_glob_and_directory_name_the_same_shards(shards):
    folder = shards[0].parent
    assert list_shards(f"{folder}/{{00000..00004}}.tar") == shards
    assert list_shards(f"{folder}/*.tar") == list_shards(folder) == shards
    assert expand_braces("a/{0..1}-{x,y}.tar") == ["a/0-x.tar", "a/0-y.tar", "a/1-x.tar", "a/1-y.tar"]
    assert shard_sizes(shards) == [5, 5, 5, 5, 4]  # from sizes.json


@pytest.mark.parametrize("pattern", ["none/*.tar", "none/{00000..00002}.tar", "empty_dir"])
def test_a_pattern_matching_no_shard_names_it(tmp_path, pattern):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ShardError, match=r"no \.tar shard matches|do not exist") as error:
        list_shards(tmp_path / pattern)
    assert str(tmp_path) in str(error.value)


def test_a_tar_that_is_not_a_tar_is_named(tmp_path):
    fake = tmp_path / "00000.tar"
    fake.write_bytes(b"<html>not found</html>" * 100)
    with pytest.raises(ShardError, match=r"00000\.tar: not a tar file"):
        list(iter_tar_samples(fake))


def test_bad_samples_are_marked_and_counting_is_cached(shards, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        add_member(tar, "a.jpg", shards[0].read_bytes()[:100])  # no caption
        add_member(tar, "b.txt", "无图".encode())  # no image
        add_member(tar, "c.jpg", b"x" * 2000)
        add_member(tar, "c.txt", "截断".encode())
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"x" * 2000) + 1000])  # truncated inside c.jpg
    problems = [s.problem for s in iter_tar_samples(bad)]
    assert problems[0].startswith("no caption") and problems[1].startswith("no image")
    assert problems[2] == "truncated shard"
    cache = tmp_path / "counts.json"
    assert shard_sizes([bad], cache) == [3] and json.loads(cache.read_text())


def stream(shards, transform, **overrides) -> ShardStream:
    values = dict(name="shards", batch_size=2, seed=3, shuffle_buffer=4, rank=0, world_size=1)
    return ShardStream(shards, 24, transform, **{**values, **overrides})


def texts(dataset, worker=None) -> list[str]:
    return [s.get("text", "<skipped>") for s in dataset]


def test_stream_order_depends_only_on_seed_and_epoch(shards, transform):
    first, again = stream(shards, transform), stream(shards, transform)
    assert texts(first) == texts(again) and len(texts(first)) == len(first) == 24
    again.set_position(1)
    assert texts(again) != texts(first)
    assert sorted(texts(first)) != texts(first)  # shuffled


def test_ranks_split_the_shards_and_get_equal_batches(shards, transform):
    ranks = [stream(shards, transform, rank=r, world_size=2, batch_size=4) for r in range(2)]
    seen = [texts(r) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 12  # 24 // (2 * 4) batches of 4 each
    keys = [{s["key"] for s in r} for r in ranks]
    assert not keys[0] & keys[1]  # disjoint shards


def test_fast_forward_yields_the_same_samples_after_the_skip(shards, transform):
    full, resumed = stream(shards, transform), stream(shards, transform)
    full.set_position(2)
    resumed.set_position(2, skip_batches=5)
    got = texts(resumed)
    assert got[:10] == ["<skipped>"] * 10 and got[10:] == texts(full)[10:]


def test_corrupt_image_is_replaced_by_the_next_sample_and_counted(shards, transform, tmp_path):
    broken = tmp_path / "broken.tar"
    with tarfile.open(shards[0]) as source, tarfile.open(broken, "w") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            add_member(tar, member.name, b"garbage" if member.name == "000000001.jpg" else data)
    samples = list(stream([broken], transform, shuffle_buffer=1, batch_size=1, seed=0))[:5]
    assert samples[1]["text"] == samples[2]["text"] and len(samples[1]["bad_images"]) == 1
    assert "000000001" in samples[1]["bad_images"][0] and not samples[2]["bad_images"]


def test_shards_without_usable_samples_stop_with_their_names(tmp_path, transform):
    empty = tmp_path / "00000.tar"
    with tarfile.open(empty, "w") as tar:
        add_member(tar, "a.txt", "只有文字".encode())
    with pytest.raises(DataError, match=r"00000\.tar: no usable sample"):
        texts(stream([empty], transform, batch_size=1))


def test_tar_source_counts_a_shared_image_once(shards, transform):
    source = TarSource(shards + shards[:1], "test shards")
    assert len(source) == 29
    assert source.image_key(0) == source.image_key(24) and source.image_key(0) != source.image_key(1)
    image = transform.load(source.open_image(3))
    assert np.asarray(image).shape[2] == 3 and source.sample_key(3) == "000000003"


def test_a_shard_that_is_not_a_tar_is_one_counted_bad_sample(shards, transform, tmp_path):
    fake = tmp_path / "fake.tar"
    fake.write_bytes(b"<html>not found</html>" * 100)
    samples = list(stream([fake, shards[0]], transform, shuffle_buffer=1, batch_size=1, seed=0))
    bad = [message for sample in samples[:6] for message in sample["bad_images"]]  # one pass
    assert len(bad) == 1 and "fake.tar: not a tar file" in bad[0]


def test_arg_checks_name_a_shard_pattern_that_matches_nothing(shards, tmp_path):
    from types import SimpleNamespace

    from component.training.arg_checks import check_paths
    from component.training.arguments import ArgumentError

    model_args = SimpleNamespace(model_name_or_path=str(tmp_path))
    data = SimpleNamespace(train_file=str(shards[0].parent / "{00000..00004}.tar"), image_path=str(tmp_path),
                           test_file=str(tmp_path / "nothing" / "*.tar"))  # fmt: skip
    with pytest.raises(
        ArgumentError, match=r"args.json: test_file: .*nothing/\*\.tar: no \.tar shard matches"
    ):
        check_paths("args.json", model_args, data)
    check_paths("args.json", model_args, SimpleNamespace(**{**vars(data), "test_file": None}))
