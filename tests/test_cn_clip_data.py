"""Chinese-CLIP data sets (tsv/jsonl and LMDB), read as cn_clip writes them; LMDBs built by its own script."""

import base64
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datatools.cn_clip_data import (
    CnClipDataError,
    LmdbData,
    TsvJsonlData,
    decode_base64,
    open_cn_clip_data,
)

needs_lmdb = pytest.mark.skipif(importlib.util.find_spec("lmdb") is None, reason="needs lmdb")
needs_cn_clip = pytest.mark.skipif(
    importlib.util.find_spec("cn_clip") is None, reason="needs cn_clip: pip install --no-deps cn_clip six"
)

COLORS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 200, 30)]
TEXTS = [
    {"text_id": 8, "text": "红色的方块", "image_ids": [1000]},
    {"text_id": 9, "text": "两张图: 绿色和蓝色", "image_ids": [1001, 1002]},
    {"text_id": 10, "text": "又一个红色", "image_ids": [1000]},
]
EXPECTED_PAIRS = [("红色的方块", "1000"), ("两张图: 绿色和蓝色", "1001"), ("两张图: 绿色和蓝色", "1002"),
                  ("又一个红色", "1000")]  # fmt: skip


def image_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_cn_clip_split(directory: Path, split: str = "valid", texts=TEXTS, url_safe=(0, 2)) -> Path:
    """`<split>_imgs.tsv` (images 1000..1003; rows in `url_safe` written in the URL-safe alphabet, as
    Chinese-CLIP's own tools do, the others in the standard one) and `<split>_texts.jsonl`."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, color in enumerate(COLORS):
        encode = base64.urlsafe_b64encode if row in url_safe else base64.b64encode
        lines.append(f"{1000 + row}\t{encode(image_bytes(color)).decode()}\n")
    (directory / f"{split}_imgs.tsv").write_text("".join(lines), encoding="utf-8")
    texts_path = directory / f"{split}_texts.jsonl"
    texts_path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return texts_path


def build_lmdb_with_cn_clip(data_dir: Path, split: str = "valid") -> Path:
    """cn_clip's own build_lmdb_dataset.py run on the tsv/jsonl split; the LMDB directory of the split."""
    spec = importlib.util.find_spec("cn_clip")
    script = Path(spec.origin).parent / "preprocess" / "build_lmdb_dataset.py"
    subprocess.run([sys.executable, str(script), "--data_dir", str(data_dir), "--splits", split],
                   check=True, capture_output=True)  # fmt: skip
    return data_dir / "lmdb" / split


def pairs_of(data) -> list[tuple[str, str]]:
    return [data.pair(i) for i in range(len(data))]


def test_tsv_jsonl_gives_one_pair_per_text_and_image(tmp_path):
    data = TsvJsonlData(write_cn_clip_split(tmp_path))
    assert pairs_of(data) == EXPECTED_PAIRS
    assert [data.text_id(i) for i in range(len(data))] == ["8", "9", "9", "10"]
    assert data.image_ids() == ["1000", "1001", "1002", "1003"]  # 1003 has no text: a candidate only


def test_tsv_images_decode_in_both_base64_alphabets(tmp_path):
    data = TsvJsonlData(write_cn_clip_split(tmp_path))
    for row, color in enumerate(COLORS):
        assert data.image_bytes(str(1000 + row)) == image_bytes(color)


def test_decode_base64_reads_url_safe_and_standard_without_padding():
    payload = bytes(range(256))
    assert decode_base64(base64.urlsafe_b64encode(payload).rstrip(b"="), "x") == payload
    assert decode_base64(base64.b64encode(payload).decode(), "x") == payload


@needs_lmdb
@needs_cn_clip
def test_lmdb_built_by_cn_clip_reads_as_the_tsv_jsonl(tmp_path):
    tsv_jsonl = TsvJsonlData(write_cn_clip_split(tmp_path))
    lmdb_data = open_cn_clip_data(build_lmdb_with_cn_clip(tmp_path))
    assert isinstance(lmdb_data, LmdbData)
    assert pairs_of(lmdb_data) == pairs_of(tsv_jsonl)
    assert [lmdb_data.text_id(i) for i in range(len(lmdb_data))] == ["8", "9", "9", "10"]
    assert sorted(lmdb_data.image_ids()) == tsv_jsonl.image_ids()
    for image_id in tsv_jsonl.image_ids():
        assert lmdb_data.image_bytes(image_id) == tsv_jsonl.image_bytes(image_id)


def test_broken_base64_names_the_tsv_line(tmp_path):
    texts_path = write_cn_clip_split(tmp_path)
    images = tmp_path / "valid_imgs.tsv"
    lines = images.read_text().splitlines(keepends=True)
    lines[2] = "1002\tnot*base64!\n"
    images.write_text("".join(lines))
    data = TsvJsonlData(texts_path)
    with pytest.raises(CnClipDataError, match=r"valid_imgs\.tsv, line 3: the image is not valid base64"):
        data.image_bytes("1002")


def test_jsonl_line_that_is_not_json_names_the_line(tmp_path):
    texts_path = write_cn_clip_split(tmp_path)
    texts_path.write_text(texts_path.read_text() + '{"text_id": 11, "text": "坏\n', encoding="utf-8")
    with pytest.raises(CnClipDataError, match=r"valid_texts\.jsonl, line 4: not JSON"):
        TsvJsonlData(texts_path)


def test_image_id_missing_from_the_tsv_names_the_line_and_id(tmp_path):
    texts = [*TEXTS, {"text_id": 11, "text": "不存在", "image_ids": [4242]}]
    texts_path = write_cn_clip_split(tmp_path, texts=texts)
    with pytest.raises(CnClipDataError, match=r"line 4: image id 4242 is not in .*valid_imgs\.tsv"):
        TsvJsonlData(texts_path)


def test_jsonl_without_sibling_tsv_or_proper_name_is_refused(tmp_path):
    texts_path = write_cn_clip_split(tmp_path)
    (tmp_path / "valid_imgs.tsv").unlink()
    with pytest.raises(CnClipDataError, match=r"valid_imgs\.tsv: no such file"):
        TsvJsonlData(texts_path)
    other = tmp_path / "captions.jsonl"
    other.write_text("{}\n")
    with pytest.raises(CnClipDataError, match=r"captions\.jsonl: a Chinese-CLIP text file is named"):
        TsvJsonlData(other)


def test_directory_without_imgs_and_pairs_is_not_a_cn_clip_lmdb(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(CnClipDataError, match=r"not a Chinese-CLIP LMDB directory \(no imgs/data.mdb, pairs"):
        open_cn_clip_data(tmp_path)


@needs_lmdb
def test_lmdb_with_foreign_records_names_the_key(tmp_path):
    import lmdb

    for part, records in {
        "imgs": {b"num_images": b"0"},
        "pairs": {b"num_samples": b"1", b"0": json.dumps(["a", "b"]).encode()},
    }.items():
        with (
            lmdb.open(str(tmp_path / part), map_size=1 << 20) as environment,
            environment.begin(write=True) as txn,
        ):
            for key, value in records.items():
                txn.put(key, value)
    with pytest.raises(CnClipDataError, match=r"pairs, key 0: not a Chinese-CLIP pair"):
        LmdbData(tmp_path)


@needs_lmdb
def test_lmdb_without_count_key_is_not_cn_clip(tmp_path):
    import lmdb

    for part in ("imgs", "pairs"):
        with (
            lmdb.open(str(tmp_path / part), map_size=1 << 20) as environment,
            environment.begin(write=True) as txn,
        ):
            txn.put(b"something", b"else")
    with pytest.raises(CnClipDataError, match=r"key num_samples is missing or not a number"):
        LmdbData(tmp_path)


def test_cn_clip_source_feeds_training_and_a_bad_row_is_replaced_and_counted(tmp_path, tiny_checkpoint):
    from component.evaluation.eval_data import CnClipSource
    from component.processor import ImageTransform, load_processor
    from component.training.dataset import ImageTextDataset

    texts_path = write_cn_clip_split(tmp_path)
    images = tmp_path / "valid_imgs.tsv"
    lines = images.read_text().splitlines(keepends=True)
    lines[1] = "1001\t%%%%\n"  # the first of text 9's two images
    images.write_text("".join(lines))
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    dataset = ImageTextDataset(CnClipSource(texts_path), transform=transform)
    assert len(dataset) == 4
    good = dataset[2]
    assert (good["text"], good["index"], good["bad_images"]) == ("两张图: 绿色和蓝色", 2, [])
    assert good["image"].shape[-1] == 3
    replaced = dataset[1]
    assert replaced["index"] != 1 and len(replaced["bad_images"]) == 1
    assert replaced["bad_images"][0].startswith("1001: ") and "line 2" in replaced["bad_images"][0]


def test_repeated_image_id_keeps_its_last_row_as_cn_clip_lmdb_does(tmp_path):
    texts_path = write_cn_clip_split(tmp_path)
    images = tmp_path / "valid_imgs.tsv"
    replacement = base64.b64encode(image_bytes((1, 2, 3))).decode()
    images.write_text(images.read_text() + f"1001\t{replacement}\n")
    data = TsvJsonlData(texts_path)
    assert data.image_ids() == ["1000", "1002", "1003", "1001"]
    assert data.image_bytes("1001") == image_bytes((1, 2, 3))


def test_only_jsonl_files_and_lmdb_like_directories_are_cn_clip_data(tmp_path):
    from datatools.cn_clip_data import is_cn_clip_data

    (tmp_path / "shards").mkdir()
    (tmp_path / "half_lmdb" / "imgs").mkdir(parents=True)
    assert not is_cn_clip_data(tmp_path / "shards")  # left to the shard reader
    assert is_cn_clip_data(tmp_path / "half_lmdb")  # refused by LmdbData, naming pairs/data.mdb
    assert is_cn_clip_data(tmp_path / "valid_texts.jsonl") and not is_cn_clip_data(tmp_path / "test.csv")


@needs_lmdb
@needs_cn_clip
def test_one_lmdb_read_by_two_readers_and_by_forked_workers(tmp_path):
    from torch.utils.data import DataLoader

    lmdb_dir = build_lmdb_with_cn_clip(write_cn_clip_split(tmp_path).parent)
    train, test = LmdbData(lmdb_dir), LmdbData(lmdb_dir)  # a train_file and a test_file on one LMDB
    assert pairs_of(train) == pairs_of(test) == EXPECTED_PAIRS

    class Images:
        def __len__(self):
            return len(train)

        def __getitem__(self, index):
            return train.image_bytes(train.pair(index)[1])

    loader = DataLoader(Images(), batch_size=1, num_workers=2, multiprocessing_context="fork",
                        collate_fn=lambda batch: batch[0])  # fmt: skip
    expected = [image_bytes(COLORS[int(image) - 1000]) for _, image in EXPECTED_PAIRS]
    assert list(loader) == expected


# --- training on Chinese-CLIP data through train_clip.py ---------------------------------------


@needs_lmdb
@needs_cn_clip
def test_train_clip_trains_and_evaluates_on_jsonl_and_lmdb_without_image_path(tiny_towers, tmp_path):
    from _runs import tiny_run_args, write_args

    import train_clip  # here: it loads torch, which the readers above do without

    texts = [{"text_id": i, "text": f"第{i}张图", "image_ids": [1000 + i % 4]} for i in range(12)]
    jsonl = write_cn_clip_split(tmp_path / "data", "train", texts=texts)
    lmdb_dir = build_lmdb_with_cn_clip(tmp_path / "data", "train")
    for name, data in (("jsonl", jsonl), ("lmdb", lmdb_dir)):
        values = tiny_run_args(tiny_towers, tmp_path, tmp_path / name, train_file=str(data),
                               test_file=str(data), max_steps=2, per_device_train_batch_size=4,
                               dataloader_num_workers=2)  # fmt: skip
        del values["image_path"]  # the images are in the data itself
        metrics = train_clip.main(["--train_args_file", str(write_args(tmp_path / f"{name}.json", **values))])
        assert metrics["eval_images"] == 4 and metrics["eval_bad_images"] == 0
        assert (tmp_path / name / "model.safetensors").is_file()
