"""Helpers for the data-tool tests: a loopback HTTP server (127.0.0.1 only), small test images,
and a probe of what a script's --help imports."""

import io
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
HELP_IN_A_FRESH_PROCESS = """
import contextlib, io, sys
import {module}
with contextlib.redirect_stdout(io.StringIO()):
    try:
        {module}.main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
print(" ".join(name for name in ("torch", "transformers") if name in sys.modules))
"""

RED = (220, 20, 20)
BLUE = (20, 20, 220)


@dataclass
class Route:
    """What the server answers for one path.

    `status`, `headers` and `body` give a plain answer; `responses` (status, headers, body)
    are used in turn, one per request, the last one repeating. `delay` waits before the
    headers; `drip` sends the body one byte per `drip` seconds, `header_drip` the status line
    and headers (a read timeout never trips, however long it takes).
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "image/jpeg"})
    responses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    delay: float = 0.0
    drip: float = 0.0
    header_drip: float = 0.0
    content_length: int | None = None  # overrides the real length (a short body then looks cut off)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes


class _ThreadingServer(ThreadingHTTPServer):
    """A threading server that stays quiet when a client hangs up mid-answer: the downloader under
    test stops and closes its connections on purpose (a full disk, Ctrl-C), and socketserver would
    print that as a traceback onto the stderr a test checks."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class LoopbackServer:
    """Serves `routes` on 127.0.0.1; counts the requests for each path, and the connections open."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self.open_connections = 0
        self._lock = threading.Lock()
        self._server = _ThreadingServer(("127.0.0.1", 0), self._handler_class())
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

    def _count_connection(self, change: int) -> None:
        with self._lock:
            self.open_connections += change

    def _handler_class(self) -> Callable[..., BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server._count_connection(1)
                super().setup()

            def finish(self) -> None:
                super().finish()
                server._count_connection(-1)

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path, encoding="utf-8")
                route, (status, headers, body) = server._answer(path)
                time.sleep(route.delay)
                if route.header_drip:
                    self._drip_head(status, headers, len(body), route.header_drip)
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                length = route.content_length if route.content_length is not None else len(body)
                if route.send_length:
                    self.send_header("Content-Length", str(length))
                else:
                    self.close_connection = True
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

            def _drip_head(self, status: int, headers: dict[str, str], length: int, drip: float) -> None:
                lines = [f"HTTP/1.1 {status} OK", *(f"{k}: {v}" for k, v in headers.items())]
                head = "\r\n".join([*lines, f"Content-Length: {length}", "", ""]).encode()
                self.close_connection = True
                try:
                    for index in range(len(head)):
                        self.wfile.write(head[index : index + 1])
                        self.wfile.flush()
                        time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator["LoopbackServer"]:
        """Serve in a background thread for the duration of the `with` block."""
        # a short poll interval: shutdown() waits for up to one
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def two_tone(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """An image whose top half is red and bottom half blue, so orientation can be checked."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (0, size[1] // 2, size[0], size[1]))
    return image.convert(mode)


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    """The bytes of `image` saved in `image_format`."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def heavy_modules_after_help(module: str) -> list[str]:
    """Which of torch and transformers a fresh Python has loaded once `module.main(["--help"])` ran."""
    code = HELP_IN_A_FRESH_PROCESS.format(module=module)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.split()
