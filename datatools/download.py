"""Fetch images over HTTP(S), turn them into small RGB JPEGs, and store them atomically.

`fetch_image` bounds every request (timeouts, a total deadline, a byte cap, redirect and retry
limits); `to_training_jpeg` decodes fully and re-encodes, so a stored file is always a good image;
`download_rows` runs both over a stream of CSV rows in a bounded thread pool. Pillow and the
socket reads release the GIL, so threads scale across cores.
"""

import email.utils
import errno
import io
import json
import os
import random
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import urllib3
from PIL import Image, ImageOps
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from datatools.image_check import (
    DEFAULT_MAX_PIXELS,
    AtomicCsvWriter,
    ImageRoot,
    InputError,
    RejectedError,
    decode_fully,
    iter_csv_rows,
    open_image,
)

REPORT_NAME = "download_report.json"
FAILED_NAME = "download_failed.csv"
OK = "ok"
SKIPPED = "skipped"
INTERRUPTED = "interrupted"
HEADERS = {
    "User-Agent": "chinese-clip-data-tools/1.0 (image downloader for CLIP training data)",
    "Accept-Encoding": "identity",  # images are compressed already
}
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})
READ_CHUNK_BYTES = 256 * 1024
JPEG_QUALITY = 90
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass(frozen=True)
class DownloadOptions:
    """Limits for one image's download and the size it is stored at."""

    timeout: float = 10.0  # seconds to connect, and seconds any single read may wait
    deadline: float = 30.0  # seconds for the whole image, all attempts and redirects included
    max_bytes: int = 20 * 2**20  # larger bodies are refused as `too_large`
    retries: int = 2  # extra attempts after timeouts, dropped connections, 408/429/5xx
    backoff: float = 1.0  # first retry waits this long, then twice as long each time (plus jitter)
    max_retry_after: float = 60.0  # a longer Retry-After gives up at once
    max_redirects: int = 5
    short_side: int = 256  # shrink so the shorter side is at most this; 0 keeps the size
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit

    def __post_init__(self) -> None:
        for name in ("timeout", "deadline", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("retries", "backoff", "max_retry_after", "max_redirects", "short_side", "max_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class FetchResult:
    """The body of a successful fetch (`reason` None), or the reason it failed."""

    data: bytes = b""
    reason: str | None = None
    attempts: int = 0


class _RetryableError(RejectedError):
    """A failure that another attempt may fix; `retry_after` is the server's requested wait."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class HttpPools:
    """Keep-alive connection pools, one set per thread, through the proxy the environment names.

    urllib3 directly, not requests: requests costs about 0.4 ms more CPU per request, which is
    about 5 % of the work on an image. `HTTP(S)_PROXY` and `NO_PROXY` are read once.
    """

    def __init__(self) -> None:
        self._proxies = urllib.request.getproxies()
        self._local = threading.local()

    def for_url(self, url: str) -> urllib3.PoolManager:
        """This thread's pool manager for `url` (a proxy manager when a proxy applies)."""
        managers: dict[str, urllib3.PoolManager] | None = getattr(self._local, "managers", None)
        if managers is None:
            managers = self._local.managers = {"": urllib3.PoolManager(num_pools=64, headers=HEADERS)}
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme, "")
        if proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            proxy = ""
        if proxy not in managers:
            managers[proxy] = urllib3.ProxyManager(proxy, num_pools=64, headers=HEADERS)
        return managers[proxy]


def check_url(url: str) -> str:
    """The stripped URL if it is an absolute http(s) URL with a host, else `bad_url`."""
    url = (url or "").strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise RejectedError("bad_url", url) from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise RejectedError("bad_url", url)
    return url


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _read_body(
    response: urllib3.BaseHTTPResponse,
    options: DownloadOptions,
    deadline: float,
    stop: threading.Event | None,
) -> bytes:
    """Read the body within the byte cap and the deadline (checked after every socket read)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > options.max_bytes:
        raise RejectedError("too_large", f"Content-Length {declared}")
    body = bytearray()
    while True:
        if stop is not None and stop.is_set():
            raise RejectedError(INTERRUPTED)
        if time.monotonic() > deadline:
            raise RejectedError("deadline")
        try:
            # read1 returns after at most one socket read, so a dripping server is noticed in time
            chunk = response.read1(READ_CHUNK_BYTES, decode_content=True)
        except ReadTimeoutError:
            raise _RetryableError("timeout") from None
        except ProtocolError:
            raise _RetryableError("incomplete_body") from None
        except Urllib3Error as error:
            raise RejectedError("connection_error", str(error)) from None
        if not chunk:
            break
        body += chunk
        if len(body) > options.max_bytes:
            raise RejectedError("too_large", f"more than {options.max_bytes} bytes")
    if not body:
        raise RejectedError("empty")
    return bytes(body)


def _redirect_target(response: urllib3.BaseHTTPResponse, url: str) -> str:
    """The absolute http(s) URL a redirect points to, else `bad_redirect`."""
    location = response.headers.get("Location", "")
    try:  # http.client decodes headers as latin-1; servers send UTF-8
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    if not location:
        raise RejectedError("bad_redirect", "no Location header")
    try:
        return check_url(urljoin(url, location))
    except RejectedError:
        raise RejectedError("bad_redirect", location) from None


def _request(pools: HttpPools, url: str, timeout: float) -> urllib3.BaseHTTPResponse:
    """Send one GET and read the status and headers (not the body), mapping errors to reasons."""
    try:
        return pools.for_url(url).request(
            "GET",
            url,
            preload_content=False,
            redirect=False,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
    except NameResolutionError:
        raise RejectedError("dns_error") from None
    except NewConnectionError:  # refused or unreachable; a subclass of ConnectTimeoutError
        raise _RetryableError("connection_error") from None
    except (ConnectTimeoutError, ReadTimeoutError):
        raise _RetryableError("timeout") from None
    except SSLError as error:
        raise RejectedError("ssl_error", str(error)) from None
    except (ProtocolError, ProxyError):
        raise _RetryableError("connection_error") from None
    except (LocationValueError, ValueError) as error:  # an invalid URL or IDNA host name
        raise RejectedError("bad_url", str(error)) from None
    except Urllib3Error as error:
        raise RejectedError("connection_error", str(error)) from None


def _fetch_once(
    pools: HttpPools, url: str, options: DownloadOptions, deadline: float, stop: threading.Event | None
) -> bytes:
    """One attempt: follow up to `max_redirects` redirects and read the body."""
    for _ in range(options.max_redirects + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RejectedError("deadline")
        response = _request(pools, url, min(options.timeout, remaining))
        complete = False
        try:
            status = response.status
            if status in REDIRECT_STATUS:
                url = _redirect_target(response, url)
                continue
            if status in RETRY_STATUS:
                retry_after = response.headers.get("Retry-After") if status in RETRY_AFTER_STATUS else None
                raise _RetryableError(f"http_{status}", parse_retry_after(retry_after))
            if not 200 <= status < 300:
                raise RejectedError(f"http_{status}")
            body = _read_body(response, options, deadline, stop)
            complete = True
            return body
        finally:
            if not complete:  # an unread or half-read body: the connection cannot be reused
                response.close()
            response.release_conn()
    raise RejectedError("too_many_redirects")


def fetch_image(
    url: str, pools: HttpPools, options: DownloadOptions, stop: threading.Event | None = None
) -> FetchResult:
    """Fetch the bytes at `url` within `options`' limits, retrying transient failures.

    Retries wait `backoff * 2**attempt` seconds (with jitter), or what a 429/503 asks for in
    Retry-After; a wait that would pass the deadline gives up at once. Setting `stop` makes a
    pending fetch give up with reason `interrupted`.
    """
    try:
        url = check_url(url)
    except RejectedError as error:
        return FetchResult(reason=error.reason)
    deadline = time.monotonic() + options.deadline
    for attempt in range(options.retries + 1):
        try:
            return FetchResult(data=_fetch_once(pools, url, options, deadline, stop), attempts=attempt + 1)
        except _RetryableError as error:
            wait_s = error.retry_after
            if wait_s is None:
                wait_s = options.backoff * 2**attempt * random.uniform(0.8, 1.2)
            gives_up = wait_s > options.max_retry_after or time.monotonic() + wait_s >= deadline
            if attempt == options.retries or gives_up:
                return FetchResult(reason=error.reason, attempts=attempt + 1)
            if stop is not None and stop.wait(wait_s):
                return FetchResult(reason=INTERRUPTED, attempts=attempt + 1)
            if stop is None:
                time.sleep(wait_s)
        except RejectedError as error:
            return FetchResult(reason=error.reason, attempts=attempt + 1)
    raise AssertionError("unreachable")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited onto white, 16-bit grey scaled down to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _shrunk_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """`size` scaled so its shorter side is `short_side`; unchanged if already that small (or 0)."""
    width, height = size
    if not short_side or min(width, height) <= short_side:
        return size
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_training_jpeg(data: bytes, short_side: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Decode `data` fully and return it as an upright RGB JPEG (quality 90), short side <= `short_side`.

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
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not lose an otherwise good image
            upright = image
        if upright.size != image.size:  # turned by 90 degrees
            target = target[::-1]
        rgb = _to_rgb(upright)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a hidden temp file and a rename: `path` is never partly written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(temp, "xb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class ImageDownloader:
    """Fetch, convert and store images; safe to call from many threads."""

    def __init__(self, options: DownloadOptions, stop: threading.Event | None = None) -> None:
        self.options = options
        self.stop = stop if stop is not None else threading.Event()
        self.pools = HttpPools()

    def download(self, url: str, path: Path) -> str:
        """Store the image at `url` as `path`; returns `ok` or a failure reason.

        Anything a remote server sends fails only its own row; an OSError that no later row can
        escape (disk full, read-only or over quota) is raised, to stop the run.
        """
        try:
            fetched = fetch_image(url, self.pools, self.options, self.stop)
            if fetched.reason is not None:
                return fetched.reason
            jpeg = to_training_jpeg(fetched.data, self.options.short_side, self.options.max_pixels)
        except RejectedError as error:
            return error.reason
        except Exception:  # a library bug tripped by one odd response must not end a long run
            return "unexpected_error"
        try:
            write_atomic(path, jpeg)
        except OSError as error:
            if error.errno in FATAL_WRITE_ERRNOS:
                raise
            return "write_error"
        return OK


def download_rows(
    tasks: Iterable[tuple[dict[str, str], str, Path | str]],
    downloader: ImageDownloader,
    threads: int,
    record: Callable[[dict[str, str], str], None],
) -> bool:
    """Download `(row, url, path_or_outcome)` tasks in `threads` threads, calling `record(row, outcome)`.

    A task whose third item is a string is already decided (`skipped` or a failure reason) and is
    recorded without a request. At most `2 * threads` downloads are in flight, so memory stays
    flat however long `tasks` is. On Ctrl-C, pending work is dropped, running downloads finish
    or give up (`interrupted`, not recorded), and True is returned; otherwise False. An error
    raised by a download (see `ImageDownloader.download`) stops the run and is re-raised.
    """
    in_flight: dict[Future, dict[str, str]] = {}

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
                in_flight[executor.submit(downloader.download, url, target)] = row
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


def plan_downloads(
    rows: Iterable[dict[str, str]], output_dir: Path
) -> Iterator[tuple[dict[str, str], str, Path | str]]:
    """Pair each row with its URL and target path, or with the outcome that needs no request.

    The outcome is `skipped` when the image already exists (a stored image is always complete),
    else `missing_filename`, `unsafe_filename` or `bad_url`.
    """
    image_root = ImageRoot(output_dir)
    reserved = {image_root.root / REPORT_NAME, image_root.root / FAILED_NAME}
    for row in rows:
        try:
            path = image_root.path(row.get("filename", ""))
            if path in reserved:
                raise RejectedError("unsafe_filename", str(path))
            if path.is_file():
                yield row, "", SKIPPED
                continue
            yield row, check_url(row.get("url", "")), path
        except RejectedError as error:
            yield row, "", error.reason


def read_failed_filenames(output_dir: Path) -> set[str]:
    """The filenames in the failure list of the last run in `output_dir`."""
    path = output_dir / FAILED_NAME
    if not path.is_file():
        raise InputError(f"{path}: no failure list to retry (run once without --retry_failed)")
    return {row.get("filename", "") for row in iter_csv_rows(path)}


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
        """Write the failure list (unless `keep_old_failure_list`) and the JSON report; return the report."""
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
            self._failed_rows.commit()
        text = json.dumps(report, ensure_ascii=False, indent=2) + "\n"
        write_atomic(self.output_dir / REPORT_NAME, text.encode("utf-8"))
        return report

    def discard(self) -> None:
        """Drop the failure list being written (the old one, if any, stays)."""
        self._failed_rows.discard()
