"""Test data from any map-style data source, and the source for a path: a CSV or Chinese-CLIP's formats.

`open_source` picks the source from the path: a `*.csv` (with `image_path`, the toolkit's CSV
format), a `*_texts.jsonl` (its images in the sibling `*_imgs.tsv`), a Chinese-CLIP LMDB directory,
or webdataset shards. Evaluation reads all of them through the `ImageTextSource` interface.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from component.errors import InputError
from component.training.dataset import ImageTextRows, StringColumn, read_image_text_csv
from component.training.shards import TarSource
from component.training.sources import CsvSource, ImageTextSource, PairReaderSource
from datatools.cn_clip_data import open_cn_clip_data
from datatools.data_kind import data_kind
from datatools.images import RejectedError
from datatools.shards import list_shards


class CnClipSource(PairReaderSource):
    """Chinese-CLIP's tsv/jsonl or LMDB as a source, plus what its evaluation protocol needs: which
    pairs share one text (its text_id), and every image of the image store, with or without a text."""

    def __init__(self, path: str | Path):
        reader = open_cn_clip_data(path)
        super().__init__(reader, reader.source)

    def text_key(self, index: int) -> str:
        return self.reader.text_id(index)

    def candidate_image_keys(self) -> list[str]:
        return self.reader.image_ids()

    def open_image_key(self, image_key: str) -> BinaryIO:
        return io.BytesIO(self.reader.image_bytes(image_key))

    @cached_property
    def rows(self) -> ImageTextRows:
        """Captions and image ids packed as a CSV source's rows hold texts and filenames (training's
        evaluation and its bad-image log read them); built on first use, in one pass."""
        texts, image_ids = StringColumn.pack_pairs(self.reader.pair(i) for i in range(len(self)))
        return ImageTextRows(texts, image_ids, self.name)


def open_source(
    path: str | Path, image_path: str | Path | None = None, csv_encoding: str | None = None
) -> ImageTextSource:
    """The map-style source of a CSV (with `image_path`), a `*_texts.jsonl`, a Chinese-CLIP LMDB, or
    webdataset shards (a .tar, a brace pattern, a glob or a directory of them)."""
    kind = data_kind(path)
    if kind == "cn_clip":
        return CnClipSource(path)
    if kind == "shards":
        return TarSource(list_shards(path), str(path))
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".csv":
        if image_path is None:
            raise InputError(
                f"{path}: a CSV needs image_path (--image_path), the folder its filenames are in"
            )
        return CsvSource(read_image_text_csv(path, csv_encoding), image_path)
    raise InputError(
        f"{path}: unknown kind of data; expected a .csv (with image_path), a Chinese-CLIP "
        "*_texts.jsonl (with its *_imgs.tsv beside it), a Chinese-CLIP LMDB directory or webdataset shards"
    )


@dataclass
class EvalSet:
    """Image-text pairs plus the images to rank.

    pair_texts / pair_text_keys / pair_images: one entry per (text, image) pair; the text key says
    which pairs share one text (Chinese-CLIP's text_id, else the text itself).
    images: every candidate image key, each once, pairs' images first (Chinese-CLIP ranks every
    image of its image store, also those without a text). `open_image(key)` gives a path or a
    binary file object (what `datatools.images.load_rgb` opens).
    """

    source: str
    pair_texts: list[str]
    pair_text_keys: list[str]
    pair_images: list[str]
    images: list[str]
    open_image: Callable[[str], Path | BinaryIO]

    def __len__(self) -> int:
        return len(self.pair_texts)


def read_eval_set(source: ImageTextSource) -> EvalSet:
    """Every pair of a map-style source, and its images; an image that cannot be found names its key."""
    count = len(source)
    texts = [source.caption(index) for index in range(count)]
    text_key = getattr(source, "text_key", None)
    text_keys = [text_key(index) for index in range(count)] if text_key else texts
    image_keys = [source.image_key(index) for index in range(count)]
    first_index: dict[str, int] = {}
    for index, key in enumerate(image_keys):
        first_index.setdefault(key, index)
    images = list(first_index)
    if hasattr(source, "candidate_image_keys"):
        images += [key for key in source.candidate_image_keys() if key not in first_index]

    def open_image(key: str) -> Path | BinaryIO:
        try:
            if key in first_index:
                return source.open_image(first_index[key])
            return source.open_image_key(key)
        except (RejectedError, OSError) as error:
            raise InputError(f"{source.name}: image {key} cannot be read ({error})") from None

    return EvalSet(source.name, texts, text_keys, image_keys, images, open_image)
