"""Where samples come from: a small interface that evaluation, the feature cache and bad-sample
replacement use, so none of them reads a CSV's columns or a shard's members directly.

A map-style source has a length and answers by index:

- `caption(index)`: the sample's text;
- `image_key(index)`: which image it is (samples sharing a key are one image in retrieval
  metrics, and one row of the feature cache's image list);
- `open_image(index)`: what `datatools.images.load_rgb` opens (a path or a binary file object);
  raises `RejectedError` or `OSError` for an image that cannot be read.

A new format (Chinese-CLIP's tsv/jsonl or LMDB, see `PairReaderSource`) is an adapter of a few lines.
Streaming sources (webdataset shards) yield samples instead; see component/training/shards.py.
"""

import io
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from datatools.image_check import ImageRoot
from datatools.images import RejectedError


@runtime_checkable
class ImageTextSource(Protocol):
    """Image-text pairs addressed by index (see the module docstring)."""

    name: str  # the file or pattern the samples come from, for messages

    def __len__(self) -> int: ...

    def caption(self, index: int) -> str: ...

    def image_key(self, index: int) -> str: ...

    def open_image(self, index: int) -> str | Path | BinaryIO: ...


class CsvSource:
    """The rows of an image-text CSV (`ImageTextRows`), images as files under `image_path`."""

    def __init__(self, rows, image_path: str | Path):
        self.rows = rows
        self.name = rows.source
        self.image_path = Path(image_path)
        self.image_root = ImageRoot(self.image_path)

    def __len__(self) -> int:
        return len(self.rows)

    def caption(self, index: int) -> str:
        return self.rows.texts[index]

    def image_key(self, index: int) -> str:
        return self.rows.filenames[index]

    def open_image(self, index: int) -> Path:
        """The path of row `index`'s image; raises `RejectedError` for a name that escapes
        image_path (absolute, `..`, a symlink out). Anything but a regular file (a FIFO would block
        a reader for ever) is refused where the image is opened, by `datatools.images`."""
        try:
            path = self.image_root.path(self.rows.filenames[index])
        except RejectedError as error:
            if error.reason == "unsafe_filename":
                raise RejectedError(error.reason, "path escapes image_path") from None
            raise
        return path

    def identity(self) -> bytes:
        """Bytes that change when the list of images changes (for the feature cache's key)."""
        filenames = self.rows.filenames
        folder = str(self.image_path.resolve()).encode()
        return folder + filenames.buffer.tobytes() + filenames.offsets.tobytes()


class PairReaderSource:
    """Any reader with `__len__`, `pair(i) -> (text, image_id)` and `image_bytes(image_id)`,
    such as Chinese-CLIP's tsv/jsonl or LMDB readers in datatools/cn_clip_data.py."""

    def __init__(self, reader, name: str):
        self.reader = reader
        self.name = name

    def __len__(self) -> int:
        return len(self.reader)

    def caption(self, index: int) -> str:
        return self.reader.pair(index)[0]

    def image_key(self, index: int) -> str:
        return str(self.reader.pair(index)[1])

    def open_image(self, index: int) -> BinaryIO:
        return io.BytesIO(self.reader.image_bytes(self.reader.pair(index)[1]))

    def identity(self) -> bytes:
        return self.name.encode() + "\n".join(self.image_key(i) for i in range(len(self))).encode()
