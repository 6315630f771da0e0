"""Host-name lookups that give up after a timeout, and the urllib3 connections that use them.

urllib3's connect timeout starts only once `socket.getaddrinfo` has returned, and getaddrinfo
takes no timeout: the system resolver's own retries can hold a thread for tens of seconds on a
dead domain, and for ever when the resolver is broken. Here each lookup runs in a daemon thread
and the connecting thread waits at most the connect timeout; a lookup it gives up on finishes in
the background. Concurrent lookups of one host share a thread, so a slow domain ties up one
thread however many rows name it. Daemon threads never delay the exit of the process.
"""

import socket
import sys
import threading

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


class _BoundedLookup:
    """For urllib3's connection classes: urllib3's `_new_conn`, with the lookup through `RESOLVER`."""

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
    """An HTTP connection whose host-name lookup is bounded by its connect timeout."""


class BoundedLookupHTTPSConnection(_BoundedLookup, HTTPSConnection):
    """An HTTPS connection whose host-name lookup is bounded by its connect timeout."""


class BoundedLookupHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = BoundedLookupHTTPConnection


class BoundedLookupHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = BoundedLookupHTTPSConnection


# For `PoolManager.pool_classes_by_scheme`, which urllib3 keeps per manager to be overridden.
POOL_CLASSES_BY_SCHEME = {"http": BoundedLookupHTTPConnectionPool, "https": BoundedLookupHTTPSConnectionPool}
