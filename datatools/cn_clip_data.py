"""Chinese-CLIP's data sets, read as it writes them: `*_texts.jsonl` + `*_imgs.tsv`, and its LMDB.

Both readers give image-text pairs, one per (text, image): a text with several images is several
pairs, as cn_clip's `build_lmdb_dataset.py` writes them. Each has `__len__`, `pair(i) -> (text,
image_id)`, `text_id(i)`, `image_ids()` (every image of the image store, in file order, the
candidates of Chinese-CLIP's evaluation) and `image_bytes(image_id)` (the encoded image, base64
decoded in the standard or the URL-safe alphabet). Memory stays small however large the data set:
the tsv is indexed by the byte offset of each line (its base64 stays on disk), texts are packed in
one UTF-8 buffer, and the LMDB is read where it lies.

Torch-free, so that the data tools can use it.
"""

import base64
import binascii
import io
import json
import os
import pickle
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from datatools.errors import UserError
from datatools.string_column import StringColumn

TEXTS_SUFFIX = "_texts.jsonl"
IMAGES_SUFFIX = "_imgs.tsv"
LMDB_PARTS = ("imgs", "pairs")
PAIR_COUNT_KEY = b"num_samples"  # keys cn_clip's build_lmdb_dataset.py writes beside the records
IMAGE_COUNT_KEY = b"num_images"
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


class CnClipDataError(UserError, ValueError):
    """A Chinese-CLIP data file the user must fix; the message names the file and the line or key."""


def decode_base64(encoded: bytes | str, where: str) -> bytes:
    """Bytes from base64 in the standard or the URL-safe alphabet (cn_clip writes either), padding optional.

    where: the file and line or key, for the error message.
    """
    if isinstance(encoded, str):
        encoded = encoded.encode("ascii", errors="replace")
    encoded = encoded.strip().translate(_URL_SAFE_TO_STANDARD)
    encoded += b"=" * (-len(encoded) % 4)
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CnClipDataError(f"{where}: the image is not valid base64 ({error})") from None
    if not decoded:
        raise CnClipDataError(f"{where}: the image is empty")
    return decoded


class _IdIndex:
    """Image ids (strings) to rows, as a sorted numpy array searched in O(log n): no dict of millions of keys.

    Where an id repeats, the last row wins, as it does in cn_clip's LMDB (a later put replaces).
    """

    def __init__(self, ids: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        self.rows = order

    def distinct_rows(self) -> np.ndarray:
        """The row of each distinct id (its last), in row order."""
        sorted_ids = self.sorted_ids
        last = np.ones(len(sorted_ids), dtype=bool)
        last[:-1] = sorted_ids[:-1] != sorted_ids[1:]  # the stable sort keeps equal ids in row order
        return np.sort(self.rows[last])

    def row(self, image_id: str) -> int | None:
        key = np.array(image_id.encode("utf-8"), dtype=self.sorted_ids.dtype)
        position = int(np.searchsorted(self.sorted_ids, key, side="right")) - 1
        if position < 0 or self.sorted_ids[position] != image_id.encode("utf-8"):
            return None
        return int(self.rows[position])


def sibling_images_file(texts_path: str | Path) -> Path:
    """The `*_imgs.tsv` beside a `*_texts.jsonl` (train_texts.jsonl -> train_imgs.tsv)."""
    texts_path = Path(texts_path)
    if not texts_path.name.endswith(TEXTS_SUFFIX):
        raise CnClipDataError(
            f"{texts_path}: a Chinese-CLIP text file is named <split>{TEXTS_SUFFIX}, with its images in "
            f"<split>{IMAGES_SUFFIX} beside it"
        )
    return texts_path.with_name(texts_path.name[: -len(TEXTS_SUFFIX)] + IMAGES_SUFFIX)


def index_image_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each `image_id<TAB>base64` line's id (bytes array) and byte offset; the base64 stays on disk."""
    ids, offsets = [], array("q")
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                image_id, tab, _ = line.partition(b"\t")
                if not tab or not image_id.strip():
                    raise CnClipDataError(f"{path}, line {number}: expected image_id<TAB>base64")
                ids.append(image_id.strip())
                offsets.append(offset)
            offset += len(line)
    if not ids:
        raise CnClipDataError(f"{path}: no images (expected image_id<TAB>base64 lines)")
    return np.array(ids, dtype=bytes), np.frombuffer(offsets, dtype=np.int64)


def read_text_lines(path: Path) -> Iterator[tuple[int, str, str, list[str]]]:
    """(line number, text_id, text, image ids) of each jsonl record; a malformed one names its line."""
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CnClipDataError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not {"text_id", "text", "image_ids"} <= record.keys():
                raise CnClipDataError(f'{where}: expected {{"text_id", "text", "image_ids": [...]}}')
            image_ids = record["image_ids"]
            if not isinstance(image_ids, list) or not image_ids or not isinstance(record["text"], str):
                raise CnClipDataError(f"{where}: text must be a string and image_ids a non-empty list")
            yield number, str(record["text_id"]), record["text"], [str(i) for i in image_ids]


class TsvJsonlData:
    """A `*_texts.jsonl` and its sibling `*_imgs.tsv`, as pairs; every image id is checked to exist."""

    def __init__(self, texts_path: str | Path):
        self.source = str(texts_path)
        self.texts_path = Path(texts_path)
        self.images_path = sibling_images_file(texts_path)
        for path in (self.texts_path, self.images_path):
            if not path.is_file():
                raise CnClipDataError(f"{path}: no such file")
        ids, self._offsets = index_image_lines(self.images_path)
        self._index = _IdIndex(ids)
        self._ids = ids
        self._read_texts()

    def _read_texts(self) -> None:
        texts, text_ids, pair_text, pair_image = [], [], array("q"), array("q")
        try:
            for number, text_id, text, image_ids in read_text_lines(self.texts_path):
                for image_id in image_ids:
                    row = self._index.row(image_id)
                    if row is None:
                        raise CnClipDataError(
                            f"{self.texts_path}, line {number}: image id {image_id} is not in "
                            f"{self.images_path}"
                        )
                    pair_text.append(len(texts))
                    pair_image.append(row)
                texts.append(text)
                text_ids.append(text_id)
        except UnicodeDecodeError as error:
            raise CnClipDataError(f"{self.texts_path}: not UTF-8 ({error.reason})") from None
        if not texts:
            raise CnClipDataError(f"{self.texts_path}: no texts")
        self._texts, self._text_ids = StringColumn(texts), StringColumn(text_ids)
        self._pair_text = np.frombuffer(pair_text, dtype=np.int64)
        self._pair_image = np.frombuffer(pair_image, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._pair_text)

    def pair(self, index: int) -> tuple[str, str]:
        """(text, image id) of pair `index`."""
        return self._texts[self._pair_text[index]], self._ids[self._pair_image[index]].decode("utf-8")

    def text_id(self, index: int) -> str:
        """The text_id of pair `index` (the pairs of one text share it)."""
        return self._text_ids[self._pair_text[index]]

    def image_ids(self) -> list[str]:
        """Every image id of the tsv, in file order (a repeated id once, where it last appears)."""
        return [self._ids[row].decode("utf-8") for row in self._index.distinct_rows()]

    def image_bytes(self, image_id: str) -> bytes:
        """The encoded image (JPEG, PNG, ...) of `image_id`, read from its line of the tsv."""
        row = self._index.row(image_id)
        if row is None:
            raise CnClipDataError(f"{self.images_path}: no image with id {image_id}")
        with open(self.images_path, "rb") as file:
            file.seek(self._offsets[row])
            line = file.readline()
        return decode_base64(line.partition(b"\t")[2], f"{self.images_path}, line {self._line_number(row)}")

    def _line_number(self, row: int) -> int:
        # Counted only for an error message: newlines before the row's offset, plus one, read a
        # chunk at a time (the file may hold gigabytes of base64).
        newlines, left = 0, int(self._offsets[row])
        with open(self.images_path, "rb") as file:
            while left > 0:
                chunk = file.read(min(left, 1 << 24))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                left -= len(chunk)
        return newlines + 1


class _PairUnpickler(pickle.Unpickler):
    """Unpickles plain tuples, strings and numbers only: a pairs record names no class, and a
    file that does is refused rather than allowed to run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


# py-lmdb refuses to open one environment twice in a process, and a forked DataLoader worker
# inherits its parent's: so each database file is opened once and shared, by the readers of one
# process (a train and a test set on the same LMDB) and by its forked workers. Read-only and
# without a lock file, an inherited environment is safe to read; each process begins its own
# transactions. Keyed by the data file's identity, so that a file replaced on disk is opened anew.
_ENVIRONMENTS: dict[tuple[str, int, int], object] = {}


def open_lmdb_read_only(path: Path):
    """An LMDB environment opened read-only, without a lock file and mapped at the data file's own
    size: cn_clip's 1 TiB map_size is what fails on small machines and Windows (its issue #281)."""
    import lmdb  # only LMDB data sets need it

    status = (path / "data.mdb").stat()
    key = (os.path.realpath(path), status.st_dev, status.st_ino)
    if key not in _ENVIRONMENTS:
        try:
            _ENVIRONMENTS[key] = lmdb.open(str(path), readonly=True, lock=False, create=False,
                                           readahead=False, meminit=False,
                                           map_size=max(status.st_size, 1 << 20))  # fmt: skip
        except lmdb.Error as error:
            raise CnClipDataError(f"{path}: not an LMDB database ({error})") from None
    return _ENVIRONMENTS[key]


class LmdbData:
    """A Chinese-CLIP LMDB directory (`imgs/` and `pairs/`, as its build_lmdb_dataset.py writes them).

    pairs: keys b"0".."n-1" -> pickle of (image_id, text_id, text), and b"num_samples" -> n.
    imgs: key str(image_id) -> base64 (URL-safe or standard) of the image, and b"num_images".
    Each process (a forked DataLoader worker too) reads in its own transactions, begun on first use.
    """

    def __init__(self, path: str | Path):
        self.source = str(path)
        self.path = Path(path)
        missing = [f"{p}/data.mdb" for p in LMDB_PARTS if not (self.path / p / "data.mdb").is_file()]
        if missing:
            raise CnClipDataError(
                f"{self.path}: not a Chinese-CLIP LMDB directory (no {', '.join(missing)});"
                " build one with cn_clip's build_lmdb_dataset.py"
            )
        self._transactions, self._pid = {}, None
        self._length = self._count(PAIR_COUNT_KEY, "pairs")
        self._count(IMAGE_COUNT_KEY, "imgs")
        if self._length:
            self.pair(0)  # a foreign LMDB fails here, at once, naming the key

    def _transaction(self, part: str):
        # One read-only transaction per database and process: a transaction must not cross a fork.
        if self._pid != os.getpid():
            environments = {p: open_lmdb_read_only(self.path / p) for p in LMDB_PARTS}
            self._transactions = {p: environment.begin() for p, environment in environments.items()}
            self._pid = os.getpid()
        return self._transactions[part]

    def _get(self, part: str, key: bytes) -> bytes | None:
        return self._transaction(part).get(key)

    def _count(self, key: bytes, part: str) -> int:
        value = self._get(part, key)
        try:
            return int(value.decode("utf-8"))
        except (AttributeError, UnicodeDecodeError, ValueError):
            raise CnClipDataError(
                f"{self.path / part}: key {key.decode()} is missing or not a number; not a Chinese-CLIP LMDB"
            ) from None

    def __len__(self) -> int:
        return self._length

    def _record(self, index: int) -> tuple[str, str, str]:
        key = str(index).encode("utf-8")
        value = self._get("pairs", key)
        where = f"{self.path / 'pairs'}, key {key.decode()}"
        if value is None:
            raise CnClipDataError(f"{where}: missing (num_samples says {self._length} pairs)")
        try:
            record = _PairUnpickler(io.BytesIO(value)).load()
        except Exception as error:  # any malformed pickle: the file is not what cn_clip writes
            raise CnClipDataError(f"{where}: not a Chinese-CLIP pair ({type(error).__name__})") from None
        if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[2], str)):
            raise CnClipDataError(f"{where}: expected a pickled (image_id, text_id, text)")
        image_id, text_id, text = record
        return str(image_id), str(text_id), text

    def pair(self, index: int) -> tuple[str, str]:
        """(text, image id) of pair `index`."""
        image_id, _, text = self._record(index)
        return text, image_id

    def text_id(self, index: int) -> str:
        """The text_id of pair `index` (the pairs of one text share it)."""
        return self._record(index)[1]

    def image_ids(self) -> list[str]:
        """Every image id in `imgs/`, in key order (as cn_clip's evaluation iterates them)."""
        cursor = self._transaction("imgs").cursor()
        keys = [key for key in cursor.iternext(values=False) if key != IMAGE_COUNT_KEY]
        return [key.decode("utf-8") for key in keys]

    def image_bytes(self, image_id: str) -> bytes:
        """The encoded image (JPEG, PNG, ...) of `image_id`."""
        key = str(image_id).encode("utf-8")
        value = self._get("imgs", key)
        if value is None:
            raise CnClipDataError(f"{self.path / 'imgs'}: no image with key {image_id}")
        return decode_base64(value, f"{self.path / 'imgs'}, key {image_id}")


def open_cn_clip_data(path: str | Path) -> TsvJsonlData | LmdbData:
    """The reader for a `*_texts.jsonl` (with its `*_imgs.tsv`) or a Chinese-CLIP LMDB directory."""
    path = Path(path)
    if path.is_dir():
        return LmdbData(path)
    return TsvJsonlData(path)


def is_cn_clip_data(path: str | Path) -> bool:
    """Whether `path` names Chinese-CLIP data: a `.jsonl` file, or a directory with an `imgs/` or a
    `pairs/` entry (its LMDB; one missing is reported by `LmdbData`). Any other directory is left to
    the other readers (a directory of webdataset shards)."""
    path = Path(path)
    if path.is_dir():
        return any((path / part).exists() for part in LMDB_PARTS)
    return path.name.endswith(".jsonl")
