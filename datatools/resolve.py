"""The bounds urllib3's timeouts leave out: on host-name lookups, and on whole requests.

urllib3's connect timeout starts only once `socket.getaddrinfo` has returned, and getaddrinfo
takes no timeout: the system resolver's own retries can hold a thread for tens of seconds on a
dead domain, and for ever when the resolver is broken. Here each lookup runs in a daemon thread
and the connecting thread waits at most the connect timeout; a lookup it gives up on finishes in
the background. Concurrent lookups of one host share a thread, so a slow domain ties up one
thread however many rows name it.

A read timeout bounds each socket read, not a response: a server that drips its headers one
byte at a time holds a thread for as long as it likes. `RequestWatch` shuts down the socket of a
request that outlives its deadline (or whose stop event is set); the connection classes here
tell it which socket a request is on. Daemon threads never delay the exit of the process.
"""

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util.connection import allowed_gai_family

# Lookups in flight at once, most of them waiting on the network; beyond this a new host fails at
# once (as a lookup timeout) rather than queueing behind dead domains.
MAX_PENDING_LOOKUPS = 512
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple]


class LookupTimeoutError(ConnectTimeoutError):
    """The host name did not resolve within the connect timeout."""


def lookup_host(host: str, port: int) -> list[AddressInfo]:
    """The system's blocking lookup, as urllib3 makes it (IPv6 only where the machine has it)."""
    return socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)


class _Lookup:
    """One lookup in flight: `done` is set once `addresses` or `error` holds its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.addresses: list[AddressInfo] = []
        self.error: OSError | None = None


class Resolver:
    """`lookup_host` in daemon threads, so that a caller can stop waiting; safe from many threads."""

    def __init__(self, max_pending: int = MAX_PENDING_LOOKUPS) -> None:
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], _Lookup] = {}
        self._lock = threading.Lock()

    def resolve(self, host: str, port: int, timeout: float | None) -> list[AddressInfo]:
        """The addresses of `host`; raises TimeoutError after `timeout` seconds, gaierror if none."""
        try:  # an address literal needs no lookup, so no thread
            return socket.getaddrinfo(
                host, port, allowed_gai_family(), socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            pass
        lookup = self._start(host, port)
        if not lookup.done.wait(timeout):
            raise TimeoutError(f"looking up {host} took over {timeout} s")
        if lookup.error is not None:  # a fresh copy: other threads may be raising the same error
            raise type(lookup.error)(*lookup.error.args)
        return lookup.addresses

    def _start(self, host: str, port: int) -> _Lookup:
        """The lookup of `(host, port)` already in flight, or a new one in its own thread."""
        key = (host, port)
        with self._lock:
            lookup = self._pending.get(key)
            if lookup is not None:
                return lookup
            if len(self._pending) >= self.max_pending:
                raise TimeoutError(f"{self.max_pending} host-name lookups are pending already")
            lookup = self._pending[key] = _Lookup()
        try:
            threading.Thread(target=self._run, args=(key, lookup), name="lookup", daemon=True).start()
        except RuntimeError as error:  # no more threads: fail this host, keep no stale entry
            self._finish(key, lookup, OSError(f"cannot start a lookup thread: {error}"))
        return lookup

    def _run(self, key: tuple[str, int], lookup: _Lookup) -> None:
        error = None
        try:
            lookup.addresses = lookup_host(*key)
        except OSError as failure:
            error = failure
        except Exception as failure:  # an odd name tripping the IDNA codec must not stay pending
            error = OSError(str(failure))
        self._finish(key, lookup, error)

    def _finish(self, key: tuple[str, int], lookup: _Lookup, error: OSError | None) -> None:
        lookup.error = error
        with self._lock:
            del self._pending[key]
        lookup.done.set()


RESOLVER = Resolver()  # one for the process, as the system resolver is


def connect(
    addresses: list[AddressInfo],
    timeout: float | None,
    source_address: tuple[str, int] | None = None,
    socket_options: list[tuple] | None = None,
) -> socket.socket:
    """A socket connected to the first of `addresses` that accepts, as urllib3 connects."""
    error: OSError = OSError("getaddrinfo returned no addresses")
    for family, kind, protocol, _, address in addresses:
        sock = None
        try:
            sock = socket.socket(family, kind, protocol)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as failure:
            error = failure
            if sock is not None:
                sock.close()
    raise error


WATCH_INTERVAL_S = 0.1  # how often the watch looks at the requests in flight
INTERRUPTED = "interrupted"  # the reason of a request ended because its stop event was set
# This thread's request, told of each connection that carries it (set by `RequestWatch.watching`).
_WATCHED_REQUEST: ContextVar[Callable[[HTTPConnection | None], None] | None] = ContextVar(
    "watched_request", default=None
)


class WatchedRequest:
    """A request (redirects and retries included) under watch: its deadline, its stop event, its socket."""

    def __init__(self, deadline: float, stop: threading.Event | None) -> None:
        self.deadline = deadline
        self.stop = stop
        self.reason: str | None = None  # `deadline` or `interrupted` once the watch has ended it
        self._connection: HTTPConnection | None = None
        self._lock = threading.Lock()

    def carried_by(self, connection: HTTPConnection | None) -> None:
        """The connection the request is on now."""
        with self._lock:
            self._connection = connection

    def check(self, now: float) -> None:
        """Once past the deadline or stopped, shut the socket down (on every look: a retry opens another)."""
        if self.reason is None:
            if self.stop is not None and self.stop.is_set():
                self.reason = INTERRUPTED
            elif now >= self.deadline:
                self.reason = "deadline"
            else:
                return
        with self._lock:
            sock = getattr(self._connection, "sock", None)
            if sock is not None:
                try:  # the plain socket's shutdown, also under TLS: a blocked read returns at once
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:  # closed already, or not connected yet
                    pass


class RequestWatch:
    """Ends requests that outlive their deadline, or whose stop event is set, by shutting their sockets down.

    One daemon thread looks at the requests in flight every `interval` seconds, and runs only
    while there are some. The thread that made the request then sees a closed connection, and
    `WatchedRequest.reason` says why.
    """

    def __init__(self, interval: float = WATCH_INTERVAL_S) -> None:
        self.interval = interval
        self._requests: set[WatchedRequest] = set()
        self._lock = threading.Lock()
        self._running = False

    @contextmanager
    def watching(self, deadline: float, stop: threading.Event | None) -> Iterator[WatchedRequest]:
        """Watch the requests this thread makes in the block, until `deadline` (time.monotonic) or `stop`."""
        request = WatchedRequest(deadline, stop)
        with self._lock:
            self._requests.add(request)
            if not self._running:
                self._running = self._start()
        token = _WATCHED_REQUEST.set(request.carried_by)
        try:
            yield request
        finally:
            _WATCHED_REQUEST.reset(token)
            request.carried_by(None)
            with self._lock:
                self._requests.discard(request)

    def _start(self) -> bool:
        try:
            threading.Thread(target=self._run, name="request-watch", daemon=True).start()
        except RuntimeError:  # no more threads: unwatched for now, the next request tries again
            return False
        return True

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._requests:
                    self._running = False
                    return
                requests = list(self._requests)
            now = time.monotonic()
            for request in requests:
                request.check(now)


def _report_connection(connection: HTTPConnection) -> None:
    """Tell this thread's watched request (if any) that `connection` carries it now."""
    carried_by = _WATCHED_REQUEST.get()
    if carried_by is not None:
        carried_by(connection)


class _BoundedLookup:
    """For urllib3's connection classes: urllib3's `_new_conn`, with the lookup through `RESOLVER`,
    and `connect` and `request` reporting the connection to the watch."""

    def connect(self) -> None:
        _report_connection(self)
        super().connect()

    def request(self, *args, **kwargs) -> None:
        _report_connection(self)
        super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else socket.getdefaulttimeout()
        host = self._dns_host.strip("[]")  # a bracketed IPv6 literal
        try:
            host.encode("idna")
        except UnicodeError:
            raise LocationParseError(f"'{host}', label empty or too long") from None
        try:
            addresses = RESOLVER.resolve(host, self.port, timeout)
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        except TimeoutError as error:
            raise LookupTimeoutError(self, f"Looking up {self.host} timed out. ({error})") from None
        try:
            sock = connect(addresses, timeout, self.source_address, self.socket_options)
        except TimeoutError as error:
            message = f"Connection to {self.host} timed out. (connect timeout={timeout})"
            raise ConnectTimeoutError(self, message) from error
        except OSError as error:
            raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class BoundedLookupHTTPConnection(_BoundedLookup, HTTPConnection):
    """An HTTP connection whose host-name lookup is bounded by its connect timeout; a watch can end it."""


class BoundedLookupHTTPSConnection(_BoundedLookup, HTTPSConnection):
    """An HTTPS connection whose host-name lookup is bounded by its connect timeout; a watch can end it."""


class BoundedLookupHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = BoundedLookupHTTPConnection


class BoundedLookupHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = BoundedLookupHTTPSConnection


# For `PoolManager.pool_classes_by_scheme`, which urllib3 keeps per manager to be overridden.
POOL_CLASSES_BY_SCHEME = {"http": BoundedLookupHTTPConnectionPool, "https": BoundedLookupHTTPSConnectionPool}
