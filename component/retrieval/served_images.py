"""Images as the search page serves them: thumbnails, uploaded queries and indexed originals.

Each is opened through datatools.images, the toolkit's one image opener (regular files only, our
pixel limit from the header, EXIF orientation, transparency onto white); its refusals become
InputError messages for the page. Free of any HTTP framework.
"""

import os
import sys
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from component.errors import InputError
from component.retrieval.web import web_image_type
from datatools.images import MAX_PIXELS, RejectedError, load_rgb, open_image, open_regular_file

THUMBNAIL_SIDE = 256


def rejection_message(error: RejectedError, what: str) -> str:
    """The InputError message for an image that datatools.images refused; `what` names it."""
    if error.reason == "decompression_bomb":
        return f"image too large: {error.detail}"
    return f"cannot read {what} ({error})"


def make_thumbnail(path: Path, side: int = THUMBNAIL_SIDE, max_pixels: int = MAX_PIXELS) -> bytes:
    """A JPEG of the image scaled to fit in side x side, upright and RGB (as `load_rgb` makes it).

    An image of more than `max_pixels` pixels is refused (InputError) undecoded; a JPEG counts at
    the reduced scale it decodes at, so a large photo still gets its thumbnail.
    """
    try:
        image = load_rgb(path, max_pixels, draft_size=(side, side))
    except RejectedError as error:
        raise InputError(rejection_message(error, "the image")) from None
    image.thumbnail((side, side))
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def read_uploaded_image(body: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image file, decoded, upright and RGB; InputError for a file that is not an image
    or has more than `max_pixels` pixels."""
    try:
        return load_rgb(BytesIO(body), max_pixels)
    except RejectedError as error:
        raise InputError(rejection_message(error, "the uploaded image")) from None


def open_served_image(path: Path) -> tuple[BinaryIO, int, str]:
    """An indexed image file opened to be sent as it is: the file, its size and its Content-Type,
    which comes from the content Pillow identifies, never from the name.

    Its pixels are not decoded, so no pixel limit applies. InputError for a file that is not a
    regular file, not an image, or an image of a type a browser does not show (its thumbnail is
    still served).
    """
    try:
        file = open_regular_file(path)
    except RejectedError as error:
        raise InputError(str(error)) from None
    try:
        with open_image(file, max_pixels=sys.maxsize) as image:  # the header only
            image_format = image.format
    except RejectedError as error:
        file.close()
        raise InputError(rejection_message(error, "the image")) from None
    content_type = web_image_type(image_format)
    if content_type is None:
        file.close()
        raise InputError(f"a {image_format} image is served only as a thumbnail")
    file.seek(0)
    return file, os.fstat(file.fileno()).st_size, content_type
