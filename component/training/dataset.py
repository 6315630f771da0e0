"""Image-text rows from a CSV, stored compactly, and a dataset that never fails on a bad image."""

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from component.processor import ImageTransform
from component.training.sources import CsvSource
from datatools.csv_rows import CsvTable, InputError
from datatools.errors import DataStopError, UserError
from datatools.images import RejectedError
from datatools.string_column import StringColumn

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("text", "filename")


@dataclass
class ImageTextRows:
    """The usable rows of an image-text CSV."""

    texts: StringColumn
    filenames: StringColumn
    source: str
    dropped_blank_text: int = 0

    def __len__(self) -> int:
        return len(self.texts)


class DataError(UserError, ValueError):
    """A training or test CSV the user must fix; the message names the file."""


def read_image_text_csv(path: str | Path, encoding: str | None = None) -> ImageTextRows:
    """Read the `text` and `filename` columns (others ignored) with the toolkit's one strict CSV reader.

    Rows with blank text or filename are dropped and counted. A malformed CSV (a stray quote, a
    row with more values than the header) raises `DataError` naming the line, as the data tools do.

    encoding: the file's encoding; None reads UTF-8 (with or without a BOM), else GB18030.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    dropped = 0

    def usable(pairs: Iterable[tuple[str, ...]]) -> Iterator[tuple[str, ...]]:
        nonlocal dropped
        for text, filename in pairs:
            if text.strip() and filename.strip():
                yield text, filename
            else:
                dropped += 1

    try:
        table = CsvTable.open(path, REQUIRED_COLUMNS, encoding)
        if table.encoding_note():
            logger.warning(table.encoding_note())
        # Row by row into the packed columns: 10M rows never exist as 10M Python objects at once.
        texts, filenames = StringColumn.pack_pairs(usable(table.columns(*REQUIRED_COLUMNS)))
    except InputError as error:
        raise DataError(str(error)) from None
    if dropped:
        logger.warning(f"{path}: dropped {dropped} row(s) with blank text or filename")
    if not len(texts):
        raise DataError(f"{path}: no rows with both text and filename")
    return ImageTextRows(texts, filenames, str(path), dropped)


def coprime_stride(n: int) -> int:
    """A jump of about n/2 that visits every row before repeating (gcd(stride, n) == 1)."""
    stride = max(1, n // 2 + 1)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


class BadImageError(DataStopError, RuntimeError):
    """Too many images failed to load for the run to be trustworthy."""


def describe_load_error(error: Exception) -> str:
    """Why an image failed to load, for the bad-image log: a refusal's reason, else the exception."""
    return str(error) if isinstance(error, RejectedError) else f"{type(error).__name__}: {error}"


class ImageTextDataset(Dataset):
    """Raw samples of a map-style source: the caption, the image as a resized uint8 array, and
    bookkeeping.

    An image that fails to load is replaced by the next loadable sample at a fixed stride, so the
    batch keeps its size and reruns see the same replacement; the failure is reported in the
    sample ("bad_images") for the trainer to count.

    source: an `ImageTextSource`, or `ImageTextRows` with `image_path` (the CSV rows and their folder).
    """

    def __init__(self, source, image_path: str | Path | None = None, transform: ImageTransform | None = None,
                 draft: bool = True):  # fmt: skip
        if isinstance(source, ImageTextRows):
            source = CsvSource(source, image_path)
        self.source = source
        self.transform = transform
        self.draft = draft
        self.replacement_stride = coprime_stride(len(source))

    @property
    def rows(self) -> ImageTextRows:
        """The CSV rows (CSV sources only; kept for callers that read the rows directly)."""
        return self.source.rows

    def __len__(self) -> int:
        return len(self.source)

    def load_image(self, index: int) -> np.ndarray:
        image = self.transform.load(self.source.open_image(index), draft=self.draft)
        return self.transform(image)

    def __getitem__(self, index: int) -> dict:
        bad_images = []
        stride = self.replacement_stride
        candidate = index
        tries = min(len(self), 100)
        for _ in range(tries):
            try:
                image = self.load_image(candidate)
                break
            except Exception as error:  # any undecodable file; never crash a long run
                bad_images.append(f"{self.source.image_key(candidate)}: {describe_load_error(error)}")
                candidate = (candidate + stride) % len(self)
        else:
            raise BadImageError(
                f"{getattr(self.source, 'image_path', self.source.name)}: {tries} images in a row failed "
                "to load; is image_path right?"
            )
        return {
            "text": self.source.caption(candidate),
            "image": image,
            "index": candidate,
            "bad_images": bad_images,
        }
