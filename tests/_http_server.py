"""A loopback HTTP server for the data-tool tests: canned routes, request counts, 127.0.0.1 only."""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Route:
    """What the server answers for one path.

    `status`, `headers` and `body` give a plain answer; `responses` (status, headers, body)
    are used in turn, one per request, the last one repeating. `delay` waits before the
    headers; `drip` sends the body one byte per `drip` seconds.
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "image/jpeg"})
    responses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    delay: float = 0.0
    drip: float = 0.0
    content_length: int | None = None  # overrides the real length (a short body then looks cut off)


class LoopbackServer:
    """Serves `routes` on 127.0.0.1 and counts the requests for each path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def url(self, path: str) -> str:
        """The absolute URL of `path` (which may hold non-ASCII characters, sent as UTF-8)."""
        return f"http://127.0.0.1:{self.port}{path}"

    def _answer(self, path: str) -> tuple[Route, tuple[int, dict[str, str], bytes]]:
        with self._lock:
            self.requests[path] += 1
            count = self.requests[path]
        route = self.routes.get(path)
        if route is None:
            return Route(), (404, {"Content-Type": "text/plain"}, b"not found")
        if route.responses:
            return route, route.responses[min(count, len(route.responses)) - 1]
        return route, (route.status, route.headers, route.body)

    def _handler_class(self) -> Callable[..., BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path, encoding="utf-8")
                route, (status, headers, body) = server._answer(path)
                time.sleep(route.delay)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                length = route.content_length if route.content_length is not None else len(body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    if route.drip:
                        for index in range(len(body)):
                            self.wfile.write(body[index : index + 1])
                            self.wfile.flush()
                            time.sleep(route.drip)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if route.content_length is not None and route.content_length != len(body):
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator["LoopbackServer"]:
        """Serve in a background thread for the duration of the `with` block."""
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
