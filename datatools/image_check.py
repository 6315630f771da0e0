"""Images on disk: safe paths under a root, full-decode checks, and checking CSV rows in worker processes.

The CSV tables themselves are read and written by `datatools.csv_rows`.

Every failure is a `RejectedError` whose `reason` is a short stable identifier (`truncated`,
`decompression_bomb`, ...), so callers can count, report and test reasons without parsing messages.
"""

import errno
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from datatools.images import MAX_PIXELS, RejectedError, open_image, reason_for_decode_error

DEFAULT_MIN_SIDE = 10
DEFAULT_MAX_ASPECT_RATIO = 10.0
DEFAULT_NAME_MAX = 255  # bytes in one part of a path, on most file systems
# Modes whose conversion to RGB is routine; anything else is converted once as part of the check.
COMMON_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class ImageRoot:
    """Resolves CSV filenames to paths under one directory, refusing any that could land elsewhere.

    Refused (reason `unsafe_filename`): absolute names, `..` components, backslashes, NUL bytes,
    and names whose directory or file resolves (through symlinks) outside the root. A blank name
    is `missing_filename`; a name with a part longer than the file system takes (255 bytes of
    UTF-8, 85 Chinese characters, on most) is `filename_too_long`, and one whose path cannot be
    examined (permission denied, an I/O error) is `unreadable`. Resolved directories are
    remembered, so a long CSV costs one lookup per directory rather than one per row.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._real_root = os.path.realpath(root)
        self._directory_is_inside: dict[str, bool] = {}
        self._name_max = longest_name(self._real_root)

    def _is_inside(self, path: str) -> bool:
        real_path = os.path.realpath(os.path.join(self._real_root, path))
        return os.path.commonpath([self._real_root, real_path]) == self._real_root

    def path(self, filename: str) -> Path:
        """The path of `filename` under the root; raises `RejectedError` if it is unsafe."""
        if not filename or not filename.strip():
            raise RejectedError("missing_filename")
        if "\\" in filename or "\x00" in filename or filename.startswith("/"):
            raise RejectedError("unsafe_filename", filename)
        parts = [part for part in filename.split("/") if part not in ("", ".")]
        if not parts or ".." in parts:
            raise RejectedError("unsafe_filename", filename)
        if any(len(os.fsencode(part)) > self._name_max for part in parts):
            raise RejectedError("filename_too_long", filename)
        directory = "/".join(parts[:-1])
        inside = self._directory_is_inside.get(directory)
        if inside is None:
            inside = self._is_inside(directory)
            if len(self._directory_is_inside) < 100_000:
                self._directory_is_inside[directory] = inside
        path = self.root.joinpath(*parts)
        try:
            escapes = not inside or (path.is_symlink() and not self._is_inside("/".join(parts)))
        except OSError as error:
            raise RejectedError(reason_for_path_error(error), str(error)) from None
        if escapes:
            raise RejectedError("unsafe_filename", filename)
        return path


def longest_name(directory: str | Path) -> int:
    """The most bytes one part of a path may have under `directory` (the file system's NAME_MAX)."""
    try:
        longest = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):  # the directory does not exist yet, or no such query here
        return DEFAULT_NAME_MAX
    return longest if longest > 0 else DEFAULT_NAME_MAX  # -1: no limit stated


def reason_for_path_error(error: OSError) -> str:
    """The reason for an OSError from examining a row's path: `filename_too_long` or `unreadable`."""
    return "filename_too_long" if error.errno == errno.ENAMETOOLONG else "unreadable"


def safe_image_path(root: str | Path, filename: str) -> Path:
    """The path of `filename` under `root`, refusing names that could land elsewhere (see `ImageRoot`)."""
    return ImageRoot(root).path(filename)


def decode_fully(image: Image.Image) -> None:
    """Decode every pixel of the current frame, mapping Pillow's errors to reasons."""
    try:
        image.load()
        if image.mode not in COMMON_MODES:
            image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise RejectedError("decompression_bomb", str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise RejectedError(reason_for_decode_error(error), str(error)) from None


def check_image(
    path: str | Path,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_pixels: int = MAX_PIXELS,
) -> str | None:
    """Why the image at `path` is unfit for training, or None when it is fine.

    The size checks run on the header, then the whole image is decoded, so truncated and corrupt
    files are caught (header sniffing would miss them). The file is never changed.

    Args:
        min_side: the shorter side must be at least this many pixels (0 disables the check).
        max_aspect_ratio: long side / short side must not exceed this (0 disables the check).
        max_pixels: the decompression-bomb limit, see `open_image`.
    """
    try:
        if not os.path.isfile(path):
            return "missing_file"
        if os.path.getsize(path) == 0:
            return "empty"
        with open_image(path, max_pixels) as image:
            short_side, long_side = sorted(image.size)
            if min_side and short_side < min_side:
                return "too_small"
            if max_aspect_ratio and long_side / short_side > max_aspect_ratio:
                return "bad_aspect_ratio"
            decode_fully(image)
    except RejectedError as error:
        return error.reason
    except OSError:
        return "unreadable"
    except Exception:  # a decoder bug tripped by one crafted file must not stop a long run
        return "decode_error"
    return None


def check_images(
    paths: Sequence[str], min_side: int, max_aspect_ratio: float, max_pixels: int
) -> list[str | None]:
    """`check_image` over a batch of paths: one task for a worker process."""
    return [check_image(path, min_side, max_aspect_ratio, max_pixels) for path in paths]


def _start_quiet_worker() -> None:
    """Worker set-up: Ctrl-C is the parent's to handle; bombs are reported, not warned about."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fork on Linux: workers inherit the imported modules instead of importing them again."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _batches(rows: Iterable[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    batch: list[dict[str, str]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def row_reason(row: dict[str, str], image_root: ImageRoot) -> tuple[str | None, Path | None]:
    """`(reason, None)` for a row that fails without opening its image, else `(None, image path)`."""
    if not (row.get("text") or "").strip():
        return "missing_text", None
    try:
        return None, image_root.path(row.get("filename") or "")
    except RejectedError as error:
        return error.reason, None


def check_rows(
    rows: Iterable[dict[str, str]],
    image_root: str | Path,
    workers: int,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_pixels: int = MAX_PIXELS,
    batch_size: int = 64,
) -> Iterator[tuple[dict[str, str], str | None]]:
    """Yield `(row, reason)` in input order, `reason` None for a row to keep.

    Images are decoded in `workers` processes (0: in this process), in batches of `batch_size`;
    at most `4 * workers` batches are in flight, so memory stays flat however long `rows` is.
    """
    limits = (min_side, max_aspect_ratio, max_pixels)
    root = ImageRoot(image_root)
    if workers == 0:
        for row in rows:
            reason, path = row_reason(row, root)
            yield row, reason if path is None else check_image(path, *limits)
        return
    executor = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_start_quiet_worker)
    try:
        executor.submit(int).result()  # start the workers now, before any other thread exists
        in_flight: deque[tuple[list[dict[str, str]], list, Future]] = deque()
        for batch in _batches(rows, batch_size):
            checked = [row_reason(row, root) for row in batch]
            paths = [str(path) for _, path in checked if path is not None]
            in_flight.append((batch, checked, executor.submit(check_images, paths, *limits)))
            if len(in_flight) >= 4 * workers:
                yield from _merge_batch(*in_flight.popleft())
        while in_flight:
            yield from _merge_batch(*in_flight.popleft())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _merge_batch(
    batch: list[dict[str, str]], checked: list[tuple[str | None, Path | None]], future: Future
) -> Iterator[tuple[dict[str, str], str | None]]:
    image_reasons = iter(future.result())
    for row, (reason, path) in zip(batch, checked, strict=True):
        yield row, reason if path is None else next(image_reasons)
