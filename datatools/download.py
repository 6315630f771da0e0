"""Download the images of CSV rows: convert each to a small RGB JPEG, store it atomically.

`to_training_jpeg` decodes fully and re-encodes, so a stored file is always a good image;
`download_rows` runs `fetch_image` and it over a stream of rows in a bounded thread pool, and
`DownloadReport` keeps the counts and failed rows that make a run resumable. Pillow and the
socket reads release the GIL, so threads scale across cores.
"""

import errno
import hashlib
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from datatools.atomic import atomic_file, write_json_atomic
from datatools.csv_rows import AtomicCsvWriter, CsvTable, InputError
from datatools.fetch import (
    INTERRUPTED,
    MAX_HOSTS_PER_THREAD,
    OUT_OF_DESCRIPTORS,
    DownloadOptions,
    HttpPools,
    check_url,
    fetch_image,
)
from datatools.image_check import (
    ImageRoot,
    RejectedError,
    decode_fully,
    open_image,
    reason_for_path_error,
)
from datatools.images import MAX_PIXELS, to_rgb, upright

REPORT_NAME = "download_report.json"
FAILED_NAME = "download_failed.csv"
OK = "ok"
SKIPPED = "skipped"
JPEG_QUALITY = 90
DEFAULT_OPEN_FILE_LIMIT = 2**20  # where the system states none
# No later row can escape these: a full, over-quota or read-only disk, or no file descriptors left.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, *OUT_OF_DESCRIPTORS})


def _shrunk_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """`size` scaled so its shorter side is `short_side`; unchanged if already that small (or 0)."""
    width, height = size
    if not short_side or min(width, height) <= short_side:
        return size
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class ConvertedImage:
    """A converted image: its JPEG bytes, its size, the upright size it had, and the source's SHA-256."""

    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str = ""


def convert_image(
    data: bytes, short_side: int = 256, max_pixels: int = MAX_PIXELS, hash_source: bool = True
) -> ConvertedImage:
    """Decode `data` fully and return it as an upright RGB JPEG (quality 90), short side <= `short_side`,
    with the SHA-256 of `data` unless `hash_source` is False (only shards record it).

    JPEGs much larger than the target are decoded at a reduced scale (PIL draft mode: 1/2, 1/4
    or 1/8 in the DCT domain), then resized with antialiased bilinear filtering; on web photos
    this is about 1.5x faster than decoding in full, and the result stays close to a full-size
    Lanczos resize (PSNR in benchmarks/bench_download.py). Raises `RejectedError`
    (`empty`, `not_an_image`, `truncated`, `decode_error`, `decompression_bomb`).
    """
    if not data:
        raise RejectedError("empty")
    with open_image(io.BytesIO(data), max_pixels) as image:
        stored_size = image.size
        target = _shrunk_size(stored_size, short_side)
        if target != stored_size and image.format == "JPEG":
            image.draft(None, target)  # DCT scaling by 1/2, 1/4 or 1/8, never below `target`
        image.decodermaxblock = len(data)  # one decode call: the GIL is released and taken once
        decode_fully(image)
        turned = upright(image)
        original = stored_size
        if turned.size != image.size:  # turned by 90 degrees
            target, original = target[::-1], stored_size[::-1]
        rgb = to_rgb(turned)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
        digest = hashlib.sha256(data).hexdigest() if hash_source else ""
        return ConvertedImage(buffer.getvalue(), *rgb.size, *original, digest)


def to_training_jpeg(data: bytes, short_side: int = 256, max_pixels: int = MAX_PIXELS) -> bytes:
    """`convert_image`'s JPEG bytes alone."""
    return convert_image(data, short_side, max_pixels, hash_source=False).jpeg


def store_image(path: Path, data: bytes) -> None:
    """Write `data` to `path` (creating its directory) so that `path` is never partly written.

    No fsync per image, which would cost a disk flush for each of millions of small files: a
    killed run leaves only complete images, but after a power cut one may be empty or cut short
    (`filter_data.py` catches both).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb", sync=False) as file:
        file.write(data)


def usable_cores() -> int:
    """The cores this process may run on (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class ImageDownloader:
    """Fetch, convert and store images; safe to call from many threads.

    Args:
        hosts_per_thread: hosts each thread keeps an idle connection to (see
            `keepalive_hosts_per_thread`).
        max_conversions: images converted at once (default: two per usable core, which keeps
            the cores busy while a conversion waits for the GIL). Conversion is CPU-bound, so
            more would not be faster, and an image near `max_pixels` takes about 1 GB while it
            decodes: hundreds of threads decoding at once could run out of memory.
    """

    def __init__(
        self,
        options: DownloadOptions,
        stop: threading.Event | None = None,
        hosts_per_thread: int = MAX_HOSTS_PER_THREAD,
        max_conversions: int | None = None,
    ) -> None:
        self.options = options
        self.stop = stop if stop is not None else threading.Event()
        self.pools = HttpPools(hosts_per_thread)
        self._conversions = threading.BoundedSemaphore(max_conversions or 2 * usable_cores())

    def convert(self, url: str, _target: object = None, hash_source: bool = True) -> ConvertedImage | str:
        """The image at `url`, converted (see `convert_image`), or a failure reason.

        Anything a remote server sends fails only its own row; an OSError that no later row can
        escape (see `FATAL_ERRNOS`) is raised, to stop the run.
        """
        try:
            fetched = fetch_image(url, self.pools, self.options, self.stop)
            if fetched.reason is not None:
                return fetched.reason
            with self._conversions:
                if self.stop.is_set():  # interrupted while waiting its turn
                    return INTERRUPTED
                options = self.options
                return convert_image(fetched.data, options.short_side, options.max_pixels, hash_source)
        except RejectedError as error:
            return error.reason
        except Exception as error:  # a library bug tripped by one odd response must not end a long run
            if isinstance(error, OSError) and error.errno in FATAL_ERRNOS:
                raise
            return "unexpected_error"

    def download(self, url: str, path: Path) -> str:
        """Store the image at `url` as `path`; returns `ok` or a failure reason (as `convert`)."""
        converted = self.convert(url, hash_source=False)  # a stored file keeps no hash
        if isinstance(converted, str):
            return converted
        try:
            store_image(path, converted.jpeg)
        except OSError as error:
            if error.errno in FATAL_ERRNOS:
                raise
            return "write_error"
        return OK


def download_rows(
    tasks: Iterable[tuple[Any, str, Any]],
    downloader: ImageDownloader,
    threads: int,
    record: Callable[[Any, Any], None],
    work: Callable[[str, Any], Any] | None = None,
) -> bool:
    """Download `(row, url, target)` tasks in `threads` threads, calling `record(row, outcome)`.

    Each task runs `work(url, target)` (default `downloader.download`: `target` is the path, the
    outcome `ok` or a reason). A task whose target is a string is already decided (`skipped` or
    a failure reason) and is recorded without a request. At most `2 * threads` downloads are in
    flight, so memory stays flat however long `tasks` is. On Ctrl-C, pending work is dropped,
    running downloads finish or give up (`interrupted`, not recorded), and True is returned;
    otherwise False. An error raised by a download, or by `record` (see
    `ImageDownloader.download`), stops the run and is re-raised.
    """
    work = work or downloader.download
    in_flight: dict[Future, Any] = {}

    def record_done(futures: Iterable[Future]) -> None:
        for future in futures:
            row = in_flight.pop(future)
            outcome = future.result()  # re-raises an error that must stop the run
            if outcome != INTERRUPTED:
                record(row, outcome)

    with ThreadPoolExecutor(threads, thread_name_prefix="download") as executor:
        try:
            for row, url, target in tasks:
                if isinstance(target, str):
                    record(row, target)
                    continue
                in_flight[executor.submit(work, url, target)] = row
                if len(in_flight) >= 2 * threads:
                    record_done(wait(in_flight, return_when=FIRST_COMPLETED).done)
            while in_flight:
                record_done(wait(in_flight, return_when=FIRST_COMPLETED).done)
            return False
        except BaseException as error:
            downloader.stop.set()
            executor.shutdown(wait=True, cancel_futures=True)
            if not isinstance(error, KeyboardInterrupt):
                raise
        finished = [future for future in in_flight if not future.cancelled() and future.exception() is None]
        record_done(finished)
        return True


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (best effort); the limit now."""
    try:
        import resource
    except ImportError:  # no such limit on Windows
        return DEFAULT_OPEN_FILE_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # macOS refuses an unlimited soft limit
            pass
    return DEFAULT_OPEN_FILE_LIMIT if soft == resource.RLIM_INFINITY else soft


def plan_downloads(
    rows: Iterable[dict[str, str]], output_dir: Path
) -> Iterator[tuple[dict[str, str], str, Path | str]]:
    """Pair each row with its URL and target path, or with the outcome that needs no request.

    The outcome is `skipped` when the image already exists (a stored image is always complete),
    else a reason: `missing_filename`, `unsafe_filename`, `filename_too_long`, `unreadable` (the
    path cannot be examined) or `bad_url`.
    """
    image_root = ImageRoot(output_dir)
    reserved = {image_root.root / REPORT_NAME, image_root.root / FAILED_NAME}
    for row in rows:
        try:
            path = image_root.path(row.get("filename", ""))
            if path in reserved:
                raise RejectedError("unsafe_filename", str(path))
            if _is_stored(path):
                yield row, "", SKIPPED
                continue
            yield row, check_url(row.get("url", "")), path
        except RejectedError as error:
            yield row, "", error.reason


def _is_stored(path: Path) -> bool:
    """Whether `path` is a file; an error examining it fails only its own row."""
    try:
        return path.is_file()
    except OSError as error:
        raise RejectedError(reason_for_path_error(error), str(error)) from None


def read_failed_filenames(output_dir: Path) -> set[str]:
    """The filenames in the failure list of the last run in `output_dir`."""
    path = output_dir / FAILED_NAME
    if not path.is_file():
        raise InputError(f"{path}: no failure list to retry (run once without --retry_failed)")
    return {filename for (filename,) in CsvTable.open(path, ["filename"]).columns("filename")}


class DownloadReport:
    """Counts, a histogram of failure reasons and the failed rows of one run in `output_dir`.

    Failed rows stream to a temp file; `save` moves it into place as `download_failed.csv`
    (with a `reason` column) and writes `download_report.json`, both atomically.
    """

    def __init__(self, output_dir: Path, fieldnames: Sequence[str]) -> None:
        self.output_dir = output_dir
        self.counts: Counter[str] = Counter({OK: 0, SKIPPED: 0, "failed": 0})
        self.reasons: Counter[str] = Counter()
        columns = [name for name in fieldnames if name != "reason"] + ["reason"]
        self._failed_rows = AtomicCsvWriter(output_dir / FAILED_NAME, columns)
        self._started = time.monotonic()

    def record(self, row: dict[str, str], outcome: str) -> None:
        """Count one finished row (`ok`, `skipped` or a failure reason)."""
        if outcome in (OK, SKIPPED):
            self.counts[outcome] += 1
            return
        self.counts["failed"] += 1
        self.reasons[outcome] += 1
        self._failed_rows.write({**row, "reason": outcome})

    def totals(self) -> dict[str, object]:
        """`total`, `ok`, `skipped`, `failed` and `failure_reasons` (most common first)."""
        return {
            "total": sum(self.counts.values()),
            **self.counts,
            "failure_reasons": dict(self.reasons.most_common()),
        }

    def save(self, details: dict[str, object], keep_old_failure_list: bool = False) -> dict[str, object]:
        """Write the failure list (unless `keep_old_failure_list`) and the JSON report; return the report.

        The failure list is written out in full before the report, and moved into place after it,
        so a full disk leaves the old pair of files, not a new report beside an old list.
        """
        elapsed = time.monotonic() - self._started
        report = {
            **self.totals(),
            **details,
            "elapsed_s": round(elapsed, 3),
            "ok_per_s": round(self.counts[OK] / elapsed, 2) if elapsed > 0 else 0.0,
        }
        if keep_old_failure_list:
            self._failed_rows.discard()
        else:
            self._failed_rows.finish()
        write_json_atomic(self.output_dir / REPORT_NAME, report)
        if not keep_old_failure_list:
            self._failed_rows.commit()
        return report

    def discard(self) -> None:
        """Drop the failure list being written (the old one, if any, stays); safe on a full disk."""
        self._failed_rows.discard()
