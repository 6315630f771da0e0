"""Fetch the bytes of an image over HTTP(S), within bounds on time, size, redirects and retries.

`fetch_image` bounds every request: timeouts (name lookup included, see `datatools.resolve`), a
total deadline, a byte cap, redirect and retry limits. Every failure is a short reason in the
result, never an exception, so one bad row cannot stop a run; the one exception is running out
of file descriptors, which no later row could escape either.
"""

import email.utils
import errno
import math
import random
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urljoin, urlsplit

import urllib3
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

from datatools.images import MAX_PIXELS, RejectedError
from datatools.resolve import INTERRUPTED, POOL_CLASSES_BY_SCHEME, LookupTimeoutError, RequestWatch

HEADERS = {
    "User-Agent": "chinese-clip-data-tools/1.0 (image downloader for CLIP training data)",
    "Accept-Encoding": "identity",  # images are compressed already
}
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})
READ_CHUNK_BYTES = 256 * 1024
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})  # the process's limit, the system's
MAX_HOSTS_PER_THREAD = 64  # keep-alive connections each download thread keeps, one per host


@dataclass(frozen=True)
class DownloadOptions:
    """Limits for one image's download and the size it is stored at."""

    timeout: float = 10.0  # seconds to look up the host, to connect, and for any single read
    deadline: float = 30.0  # seconds for the whole image, all attempts and redirects included
    max_bytes: int = 20 * 2**20  # larger bodies are refused as `too_large`
    retries: int = 2  # extra attempts after timeouts, dropped connections, 408/429/5xx
    backoff: float = 1.0  # first retry waits this long, then twice as long each time (plus jitter)
    max_retry_after: float = 60.0  # a longer Retry-After gives up at once
    max_redirects: int = 5
    short_side: int = 256  # shrink so the shorter side is at most this; 0 keeps the size
    max_pixels: int = MAX_PIXELS  # decompression-bomb limit

    def __post_init__(self) -> None:
        for name in ("timeout", "deadline", "backoff", "max_retry_after"):
            if not math.isfinite(getattr(self, name)):  # NaN compares false: it would pass the checks below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
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


def keepalive_hosts_per_thread(threads: int, open_file_limit: int) -> int:
    """How many hosts each of `threads` threads keeps a connection to: idle sockets stay within a
    quarter of `open_file_limit` (the rest is for sockets in use, files being written, lookups)."""
    return max(1, min(MAX_HOSTS_PER_THREAD, open_file_limit // (4 * threads)))


class HttpPools:
    """Keep-alive connection pools, one set per thread, through the proxy the environment names.

    Each thread keeps an idle connection to at most `hosts_per_thread` hosts (the most recently
    used), so that the idle sockets of all threads cannot use up the file descriptors. urllib3
    directly, not requests: requests costs about 0.4 ms more CPU per request, which is about 5 %
    of the work on an image. `HTTP(S)_PROXY` and `NO_PROXY` are read once. `watch` ends
    requests past their deadline.
    """

    def __init__(self, hosts_per_thread: int = MAX_HOSTS_PER_THREAD) -> None:
        if hosts_per_thread < 1:
            raise ValueError(f"hosts_per_thread must be at least 1, got {hosts_per_thread}")
        self.hosts_per_thread = hosts_per_thread
        self._proxies = urllib.request.getproxies()
        self._local = threading.local()
        self.watch = RequestWatch()

    def for_url(self, url: str) -> urllib3.PoolManager:
        """This thread's pool manager for `url` (a proxy manager when a proxy applies)."""
        managers: dict[str, urllib3.PoolManager] | None = getattr(self._local, "managers", None)
        if managers is None:
            managers = self._local.managers = {}
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme, "")
        if proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            proxy = ""
        if proxy not in managers:
            managers[proxy] = _pool_manager(proxy, self.hosts_per_thread)
        return managers[proxy]


def _pool_manager(proxy: str, hosts: int) -> urllib3.PoolManager:
    """A pool manager (through `proxy` unless it is empty) whose host-name lookups are bounded.

    A thread makes one request at a time, so each host's pool holds one connection (maxsize 1).
    """
    if proxy:
        manager = urllib3.ProxyManager(proxy, num_pools=hosts, maxsize=1, headers=HEADERS)
    else:
        manager = urllib3.PoolManager(num_pools=hosts, maxsize=1, headers=HEADERS)
    manager.pool_classes_by_scheme = POOL_CLASSES_BY_SCHEME
    return manager


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
    """Send one GET and read the status and headers (not the body), mapping errors to reasons.

    Raises the OSError behind a failure when no file descriptor was left (see `OUT_OF_DESCRIPTORS`).
    """
    try:
        return pools.for_url(url).request(
            "GET",
            url,
            preload_content=False,
            redirect=False,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
    except (Urllib3Error, ValueError) as error:
        _raise_if_out_of_descriptors(error)
        raise _request_error(error) from None


def _request_error(error: Exception) -> RejectedError:
    """The reason (retryable or not) for an error from sending a request."""
    if isinstance(error, NameResolutionError):
        return RejectedError("dns_error")
    if isinstance(error, LookupTimeoutError):  # not retried: a retry would wait on the same lookup
        return RejectedError("dns_timeout")
    if isinstance(error, NewConnectionError):  # refused or unreachable; a ConnectTimeoutError too
        return _RetryableError("connection_error")
    if isinstance(error, ConnectTimeoutError | ReadTimeoutError):
        return _RetryableError("timeout")
    if isinstance(error, SSLError):
        return RejectedError("ssl_error", str(error))
    if isinstance(error, ProxyError):
        if isinstance(error.original_error, LookupTimeoutError):  # the proxy's own host name
            return RejectedError("dns_timeout")
        return _RetryableError("connection_error")
    if isinstance(error, ProtocolError):
        return _RetryableError("connection_error")
    if isinstance(error, LocationValueError | ValueError):  # an invalid URL or IDNA host name
        return RejectedError("bad_url", str(error))
    return RejectedError("connection_error", str(error))


def _raise_if_out_of_descriptors(error: BaseException) -> None:
    """Raise the OSError behind `error` (its cause, or their causes) if it is EMFILE or ENFILE."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in OUT_OF_DESCRIPTORS:
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


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
    Retry-After; a wait that would pass the deadline gives up at once. A request still running
    at the deadline has its connection shut down (`pools.watch`), whatever phase it is in.
    Setting `stop` makes a pending fetch give up with reason `interrupted`. Raises OSError only
    when no file descriptor is left for a connection (EMFILE, ENFILE).
    """
    try:
        url = check_url(url)
    except RejectedError as error:
        return FetchResult(reason=error.reason)
    deadline = time.monotonic() + options.deadline
    with pools.watch.watching(deadline, stop) as watched:
        result = _fetch_with_retries(pools, url, options, deadline, stop)
    if watched.reason is not None:  # its socket was shut down: whatever came of it is void
        return FetchResult(reason=watched.reason, attempts=result.attempts)
    return result


def _fetch_with_retries(
    pools: HttpPools, url: str, options: DownloadOptions, deadline: float, stop: threading.Event | None
) -> FetchResult:
    """`fetch_image` after the URL check: the attempts and the waits between them."""
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
