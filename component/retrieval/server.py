"""The search service on uvicorn: `retrieval.py serve`, and a server in a thread for tests and benchmarks.

uvicorn runs the FastAPI application (component.retrieval.service) wrapped in the web policies
(component.retrieval.asgi_policies), on one socket bound to loopback unless --host says otherwise.
uvicorn itself never times out a connection before its first request, nor a client that stops
reading an answer, and answers a malformed request line without our headers; `GuardedH11Protocol`
adds what today's guarantees need:

- at most `max_connections` connections at once; one more is answered 503 (with the security
  headers) and closed without reading its request;
- a connection must send a complete request head within `request_timeout` seconds of opening (or
  of its previous answer), and a client that reads nothing of an answer for `request_timeout`
  seconds is dropped: a slow or stuck client holds one connection slot for a bounded time;
- a malformed request is answered 400 in JSON, with the security headers.
"""

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from component.errors import InputError
from component.retrieval.asgi_policies import BodyLimits, WebPolicy, with_security_headers
from component.retrieval.index import RetrievalIndex
from component.retrieval.query_encoders import Backend, load_query_encoder
from component.retrieval.served_index import IndexReloader
from component.retrieval.service import ServiceState, create_app
from component.retrieval.web import LOOPBACK_HOSTS, allowed_host_names, host_name

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one image file sent to /api/search_image
MAX_JSON_BYTES = 64 * 1024 * 1024  # /api/embed and /api/similarity: up to 16 images in base64
MAX_OTHER_BYTES = 64 * 1024  # every other request has no body worth the name
REQUEST_TIMEOUT = 30.0  # seconds a connection may keep the server waiting
MAX_CONNECTIONS = 64  # connections served at once; more get 503
MAX_HEAD_BYTES = 64 * 1024  # request line and headers


@dataclass(frozen=True)
class ServiceLimits:
    """What one client may take: body sizes, time without progress, connections at once."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_json_bytes: int = MAX_JSON_BYTES
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


def raw_response(status: int, reason: bytes, body: bytes) -> bytes:
    """A complete HTTP/1.1 JSON answer that closes the connection, with the security headers."""
    headers = with_security_headers([(b"content-type", b"application/json")])
    headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    lines = [b"HTTP/1.1 %d %s" % (status, reason), *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection limit and a watchdog for stalled clients."""

    max_connections = MAX_CONNECTIONS  # set per server by `guarded_protocol`
    request_timeout = REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.refused = len(self.connections) > self.max_connections
        if self.refused:
            body = b'{"error": "too many connections; try again"}'
            transport.write(raw_response(503, b"Service Unavailable", body))
            # Half-close and read on for a moment: closing with the request unread would reset
            # the connection, and the client might lose the answer.
            transport.write_eof()
            self.watchdog = self.loop.call_later(1.0, transport.close)
            return
        self.last_progress: tuple = (None, 0)  # (the request cycle, bytes waiting to be sent)
        self.watchdog = self.loop.call_later(self.request_timeout, self.check_progress)

    def check_progress(self) -> None:
        """Drop the connection when a whole period passed without a new request while it waited
        for one, or without the client reading any of an answer it was sent; otherwise look again
        a period later. A request being computed or a body being received is left alone (the body
        has its own timeout, in `BodyLimits`)."""
        if self.transport.is_closing():
            return
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        progress = (self.cycle, self.transport.get_write_buffer_size())
        if progress == self.last_progress and (waiting_for_head or self.flow.write_paused):
            self.transport.close()
            return
        self.last_progress = progress
        self.watchdog = self.loop.call_later(self.request_timeout, self.check_progress)

    def data_received(self, data: bytes) -> None:
        if not self.refused:  # a refused connection's request is read and dropped
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": msg}).encode("ascii")
        self.transport.write(raw_response(400, b"Bad Request", body))
        self.transport.close()


def guarded_protocol(limits: ServiceLimits) -> type[GuardedH11Protocol]:
    """The protocol class for one server's limits."""
    attributes = {"max_connections": limits.max_connections, "request_timeout": limits.request_timeout}
    return type("ServerProtocol", (GuardedH11Protocol,), attributes)


def build_asgi_app(state: ServiceState, allowed_hosts: frozenset[str], limits: ServiceLimits):
    """The FastAPI application inside its body limits, inside the web policies."""
    body_limits = {"/api/search_image": limits.max_upload_bytes}
    body_limits |= {"/api/embed": limits.max_json_bytes, "/api/similarity": limits.max_json_bytes}
    app = BodyLimits(create_app(state), body_limits, MAX_OTHER_BYTES, limits.request_timeout)
    return WebPolicy(app, allowed_hosts)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: any free port); InputError when it cannot be had."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port} ({error})") from error
    sock.setblocking(False)
    return sock


class SearchServer:
    """The service for one index on one socket; `run()` serves until stopped or interrupted.

    Args:
        allowed_hosts: Host names answered besides the loopback names and `host` ("*": any).
    """

    def __init__(
        self,
        state: ServiceState,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: str | list[str] | tuple[str, ...] = (),
        limits: ServiceLimits = ServiceLimits(),
        log_requests: bool = True,
    ):
        self.state = state
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.socket = bind(host, port)
        config = uvicorn.Config(
            build_asgi_app(state, self.allowed_hosts, limits),
            http=guarded_protocol(limits),
            lifespan="off",
            access_log=log_requests,
            log_level="info" if log_requests else "warning",
            server_header=False,
            timeout_keep_alive=5,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def run(self) -> None:
        """Serve until `stop()` or Ctrl+C."""
        self.server.run(sockets=[self.socket])

    def stop(self) -> None:
        self.server.should_exit = True

    @contextmanager
    def running_in_thread(self) -> Iterator["SearchServer"]:
        """Serve from a thread for the `with` block (tests and benchmarks)."""
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        while not self.server.started and thread.is_alive():
            threading.Event().wait(0.01)
        try:
            yield self
        finally:
            self.stop()
            thread.join(10)
            self.socket.close()


def search_server(
    index: RetrievalIndex,
    backend: Backend = "torch",
    onnx_dir: str | Path | None = None,
    **options,
) -> SearchServer:
    """A server for `index`, queries encoded by `backend`; `options` go to `SearchServer`."""
    encoder = load_query_encoder(index, backend, onnx_dir)
    return SearchServer(ServiceState(IndexReloader(index), encoder), **options)


def serve(
    index: RetrievalIndex,
    host: str = "127.0.0.1",
    port: int = 8000,
    allowed_hosts: str | list[str] | tuple[str, ...] = (),
    backend: Backend = "torch",
    onnx_dir: str | Path | None = None,
) -> None:
    """Serve the search page and the API for `index` until interrupted (Ctrl+C)."""
    server = search_server(index, backend, onnx_dir, host=host, port=port, allowed_hosts=allowed_hosts)
    if host_name(host) not in LOOPBACK_HOSTS:
        print(
            f"warning: listening on {host}: other machines can search this index; they must use one "
            f"of the names {', '.join(sorted(server.allowed_hosts))} (add more with --allowed_hosts)",
            file=sys.stderr,
        )
    print(
        f"Searching {len(index)} images of {index.directory} at {server.url} with the {backend} "
        f"backend; API reference at {server.url}docs (Ctrl+C to stop)",
        flush=True,
    )
    server.run()
