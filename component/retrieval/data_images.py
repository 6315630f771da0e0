"""The images of a data source that holds them (webdataset shards, Chinese-CLIP's tsv/jsonl or LMDB),
written once each into a folder of the index directory, so that the index and the search server
work with image files as for a folder.

Each distinct image (by the source's `image_key`) becomes one file whose name comes from the key
alone, so a re-run finds the images it wrote and reads none of them again; the key is never used
as a path. The original bytes are kept when the page can show them as they are (JPEG, PNG, WebP,
GIF); other formats are re-encoded to JPEG.
"""

import hashlib
import io
import re
from pathlib import Path

from component.errors import InputError
from component.evaluation.eval_data import open_source
from component.retrieval.images import ImageSource
from datatools.atomic import atomic_file
from datatools.images import RejectedError, load_rgb, open_image

IMAGES_FOLDER = "images"  # inside the index directory
KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
_PLAIN_KEY = re.compile(r"[0-9a-z_-]{1,100}")
_UNSAFE = re.compile(r"[^0-9A-Za-z_-]+")


def file_stem(image_key: str) -> str:
    """A file name stem for an image key: the key itself when it is plain (lower-case letters,
    digits, `_` and `-`, at most 100), else what is safe of it plus a digest of the whole key, so
    that two keys never share a stem (also on a case-insensitive file system)."""
    if _PLAIN_KEY.fullmatch(image_key):
        return image_key
    digest = hashlib.blake2b(image_key.encode("utf-8"), digest_size=8).hexdigest()
    safe = _UNSAFE.sub("_", image_key)[:60].strip("_")
    return f"{safe}-{digest}" if safe else digest


def image_file(data: bytes) -> tuple[bytes, str]:
    """The bytes to write for an image and their suffix: the original for a kept format, else a JPEG.

    Raises `RejectedError` for bytes that are not an image (or too large, by the toolkit's one opener).
    """
    with open_image(io.BytesIO(data)) as image:  # the header only
        image_format = image.format
    if image_format in KEPT_FORMATS:
        return data, KEPT_FORMATS[image_format]
    buffer = io.BytesIO()
    load_rgb(io.BytesIO(data)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue(), ".jpg"


def _existing_files(folder: Path) -> dict[str, str]:
    # stem -> file name, of the files an earlier run wrote
    return {path.stem: path.name for path in folder.iterdir() if path.suffix in KEPT_FORMATS.values()}


def _sample_name(source, index: int, image_key: str) -> str:
    # How a report names a sample: a shard's sample key, else the image key.
    if hasattr(source, "sample_key"):
        return f"{source.name} sample {source.sample_key(index)}"
    return f"{source.name} image {image_key}"


def images_in_data(path: str | Path, folder: str | Path) -> ImageSource:
    """Write each distinct image of the data at `path` (shards or Chinese-CLIP data) into `folder`,
    once, and return them as an `ImageSource` rooted there, each with its first caption.

    An image already in `folder` (from an earlier run) is not read again. A sample whose bytes are
    not an image is left out and listed in `ImageSource.unreadable`.
    """
    source = open_source(path)
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    existing = _existing_files(folder)
    first_texts: dict[str, str] = {}
    unreadable: list[dict[str, str]] = []
    seen: set[str] = set()
    for index in range(len(source)):
        key = source.image_key(index)
        if key in seen:
            continue
        seen.add(key)
        stem = file_stem(key)
        if stem not in existing:
            try:
                data, suffix = image_file(source.open_image(index).read())
            except (RejectedError, OSError) as error:
                unreadable.append({"filename": _sample_name(source, index, key), "error": str(error)})
                continue
            with atomic_file(folder / f"{stem}{suffix}", sync=False) as file:  # re-created if lost
                file.write(data)
            existing[stem] = f"{stem}{suffix}"
        first_texts.setdefault(existing[stem], source.caption(index))
    if not first_texts and not unreadable:
        raise InputError(f"{path}: holds no samples, so nothing was indexed")
    return ImageSource(folder, list(first_texts), list(first_texts.values()), True, unreadable)
