"""The one way every part of the toolkit opens an image: downloads, filtering, training, encoding,
indexing and the search page.

It states each policy once:
- only regular files are opened (a FIFO or a device would block a reader for ever);
- an image with more pixels than `MAX_PIXELS` (after JPEG draft scaling) is refused from its header,
  before any pixel is decoded; the limit is ours, not Pillow's global `Image.MAX_IMAGE_PIXELS`
  (Pillow's own refusal at twice its global stays as a backstop);
- the EXIF orientation is applied;
- RGB conversion composites transparency onto white and scales 16-bit grey to 8 bits.

Torch-free, so that the data tools stay quick to start.
"""

import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default, stated here so that our limit never depends on someone changing the global.
MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
Size = tuple[int, int]  # (width, height)
# A JPEG's draft target: a size, or a function of the stored size that gives one.
DraftSize = Size | Callable[[Size], Size] | None
# Decoded by running Ghostscript on the file, whatever its name says: never opened.
_INTERPRETED_FORMATS = frozenset({"EPS"})
_SIXTEEN_BIT_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class RejectedError(Exception):
    """A row or image that must not be used; `reason` is a short stable identifier."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def reason_for_decode_error(error: BaseException) -> str:
    """`truncated` for an image cut short (common enough to name apart), `decode_error` otherwise."""
    return "truncated" if "truncated" in str(error).lower() else "decode_error"


def open_regular_file(path: str | Path) -> IO[bytes]:
    """A binary file object for `path`, refusing anything that is not a regular file.

    The file is opened without blocking and checked on its descriptor, so a FIFO or a device is
    refused at once (and a file swapped for one between a check and the open is refused too).
    Raises `RejectedError` (`missing_file`, `not_a_file`, `unreadable`).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RejectedError("missing_file", str(path)) from None
    except IsADirectoryError:
        raise RejectedError("not_a_file", f"{path} is a directory") from None
    except OSError as error:
        raise RejectedError("unreadable", f"{path}: {error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise RejectedError("not_a_file", f"{path} is not a regular file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def open_image(
    source: str | Path | IO[bytes], max_pixels: int = MAX_PIXELS, draft_size: DraftSize = None
) -> Image.Image:
    """Open an image (its header only, no pixels decoded), refusing non-images and decompression bombs.

    Args:
        source: a path (regular files only) or a binary file object.
        max_pixels: an image with more pixels than this is refused as `decompression_bomb`.
        draft_size: (width, height) a JPEG may be decoded down to (DCT scaling by 1/2, 1/4 or 1/8,
            never below it), or a function of the stored size giving it; the pixels at that scale
            are what count against `max_pixels`.
    Raises `RejectedError` (`missing_file`, `not_a_file`, `unreadable`, `not_an_image`,
    `decompression_bomb`, `truncated`, `decode_error`).
    """
    owned = isinstance(source, (str, Path))
    file = open_regular_file(source) if owned else source
    try:
        image = _identify(file)
    except RejectedError:
        if owned:
            file.close()
        raise
    if owned:
        image._exclusive_fp = True  # closing the image closes the file we opened, as Image.open(path) does
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size(image.size) if callable(draft_size) else draft_size)
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise RejectedError("decompression_bomb", f"{width} x {height} pixels, the limit is {max_pixels}")
    if width < 1 or height < 1:
        image.close()
        raise RejectedError("decode_error", f"size {width} x {height}")
    return image


@functools.cache
def _image_formats() -> tuple[str, ...]:
    """Every format Pillow reads except those it hands to an outside interpreter (Ghostscript)."""
    Image.init()
    return tuple(name for name in Image.ID if name not in _INTERPRETED_FORMATS)


def _identify(file: IO[bytes]) -> Image.Image:
    """Pillow's lazy open, its errors mapped to reasons."""
    try:
        return Image.open(file, formats=_image_formats())
    except Image.DecompressionBombError as error:  # over twice Pillow's global limit
        raise RejectedError("decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise RejectedError("not_an_image") from None
    except OSError as error:
        reason = "unreadable" if error.errno is not None else reason_for_decode_error(error)
        raise RejectedError(reason, str(error)) from None
    except (SyntaxError, ValueError, EOFError) as error:
        raise RejectedError(reason_for_decode_error(error), str(error)) from None


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation; a malformed EXIF block leaves it as it is."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited onto white, 16-bit grey scaled down to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_GREY:
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_rgb(
    source: str | Path | IO[bytes], max_pixels: int = MAX_PIXELS, draft_size: DraftSize = None
) -> Image.Image:
    """Open, fully decode and orient an image as RGB, with every policy of `open_image` and `to_rgb`.

    Raises `RejectedError` as `open_image` does, and for pixels that fail to decode.
    """
    with open_image(source, max_pixels, draft_size) as image:
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise RejectedError("decompression_bomb", str(error)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise RejectedError(reason_for_decode_error(error), str(error)) from None
        rgb = to_rgb(upright(image))
        if rgb is image:  # still tied to the file closed on leaving the with block
            rgb = image.copy()
    return rgb
