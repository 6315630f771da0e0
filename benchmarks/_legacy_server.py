"""LEGACY REFERENCE, for benchmarks/bench_service.py only: the search page as it was served by the
standard library's http.server before the FastAPI service (component/retrieval/service.py)
replaced it in `retrieval.py serve`. Kept so that the benchmark can compare the two side by side on
the same machine in one run; nothing in the toolkit serves with it.

    GET  /                             the page: a text box and an image upload, results as thumbnails
    GET  /api/search?text=T&top_k=K    {"query": T, "results": [{"filename", "score", ...}]}, best first
    POST /api/search_image?top_k=K     the same for the image file sent as the request body
    GET  /thumbnail?path=F             a JPEG thumbnail (at most 256 px a side) of an indexed image
    GET  /image?path=F                 an indexed image file itself, typed by its content

Only files that the index lists and that lie under its image root are served. The web policies
(Host names, response types, security headers, the thumbnail cache) live in component.retrieval.web.
Uploads and thumbnails are decoded a few at a time (IMAGES_DECODED_AT_ONCE), and those of too
many pixels are refused before they are decoded (component.retrieval.served_images); thumbnails
are cached. Each connection times out after `request_timeout` seconds without progress, and at
most MAX_CONNECTIONS are served at once. A later index run into the same directory is picked up by
the next request, without a restart.
"""

import json
import sys
import threading
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from component.errors import InputError
from component.retrieval.index import RetrievalIndex, results_document
from component.retrieval.served_images import (
    make_thumbnail,
    open_served_image,
    read_uploaded_image,
)
from component.retrieval.served_index import IndexReloader, ServedIndex
from component.retrieval.web import (
    LOOPBACK_HOSTS,
    ThumbnailCache,
    add_nonce,
    allowed_host_names,
    file_key,
    host_name,
    host_refusal,
    new_nonce,
    security_headers,
)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_TOP_K = 100
DEFAULT_TOP_K = 12
IMAGES_DECODED_AT_ONCE = 2  # uploads and thumbnails decoded at once: bounds their memory
THUMBNAIL_CACHE_BYTES = 32 * 1024 * 1024  # some 2,000 thumbnails
REQUEST_TIMEOUT = 30.0  # seconds a connection may wait for the client
MAX_CONNECTIONS = 64  # connections served at once, each in a thread; more get 503
SEND_CHUNK_BYTES = 1024 * 1024
PAGE_FILE = Path(__file__).parent.parent / "component" / "retrieval" / "page.html"


@cache
def page_template() -> str:
    """The search page, with __COUNT__, __MAX_TOP_K__ and __TOP_K__ to fill in."""
    return PAGE_FILE.read_text(encoding="utf-8")


def parse_top_k(values: list[str] | None) -> int:
    """The top_k query parameter: 1 to MAX_TOP_K, DEFAULT_TOP_K when absent."""
    if not values:
        return DEFAULT_TOP_K
    try:
        top_k = int(values[0])
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= MAX_TOP_K:
        raise InputError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {values[0]!r}")
    return top_k


class RetrievalServer(ThreadingHTTPServer):
    """The search page's HTTP server; each connection runs in its own thread, queries one at a time.

    Each request first compares the index's index.json with the one it was opened from (one stat
    call); after an index run has replaced it, the index is opened again and swapped in.

    Args:
        allowed_hosts: Host names answered besides the loopback names and `host` ("*": any).
        request_timeout: seconds a connection may wait for the client before it is dropped.
        max_connections: connections served at once; one more is answered 503 and closed.
    """

    daemon_threads = True

    def __init__(
        self,
        index: RetrievalIndex,
        host: str = "127.0.0.1",
        port: int = 0,
        log_requests: bool = True,
        allowed_hosts: str | list[str] | tuple[str, ...] = (),
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ):
        try:
            super().__init__((host, port), RetrievalRequestHandler)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error})") from error
        self.reloader = IndexReloader(index)
        self.search_lock = threading.Lock()  # one model forward at a time
        self.decode_slots = threading.BoundedSemaphore(IMAGES_DECODED_AT_ONCE)  # uploads and thumbnails
        self.thumbnails = ThumbnailCache(THUMBNAIL_CACHE_BYTES)
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.request_timeout = request_timeout
        self.connection_slots = threading.BoundedSemaphore(max_connections)
        self.log_requests = log_requests

    def process_request(self, request, client_address) -> None:
        """Serve the connection in a thread of its own, or refuse it when all slots are taken."""
        if not self.connection_slots.acquire(blocking=False):
            refuse_connection(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def current(self) -> ServedIndex:
        """The index to answer a request from, reloaded first when an index run has replaced it."""
        return self.reloader.current()


def refuse_connection(connection) -> None:
    """Answer 503 on a connection over the limit, without reading its request."""
    headers = "".join(f"{name}: {value}\r\n" for name, value in security_headers().items())
    try:
        connection.settimeout(1.0)
        status = "HTTP/1.0 503 Service Unavailable\r\n"
        connection.sendall(f"{status}{headers}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    except OSError:
        pass  # the client is gone or not reading: closing is all that is left


class RetrievalRequestHandler(BaseHTTPRequestHandler):
    """The page, the two search endpoints, and indexed images with their thumbnails."""

    server: RetrievalServer
    page_nonce: str | None = None  # set while the page is being sent

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # applied to the socket by StreamRequestHandler
        super().setup()

    def do_GET(self) -> None:
        if self.refused_host():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        served = self.server.current()
        if url.path == "/":
            self.send_page(len(served.index))
        elif url.path == "/api/search":
            self.answer_search(query, lambda top_k: self.search_text(served.index, query, top_k))
        elif url.path == "/thumbnail":
            self.send_thumbnail(served, query.get("path", [""])[0])
        elif url.path == "/image":
            self.send_image(served, query.get("path", [""])[0])
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:
        if self.refused_host():
            return
        url = urlsplit(self.path)
        if url.path != "/api/search_image":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})
            return
        length_header = self.headers.get("Content-Length", "")
        length = int(length_header) if length_header.isdigit() else -1
        if not 0 < length <= MAX_UPLOAD_BYTES:
            self.close_connection = True  # the body, if any, is not read
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.LENGTH_REQUIRED
            self.send_json(status, {"error": f"send one image file of at most {MAX_UPLOAD_BYTES} bytes"})
            return
        body = self.rfile.read(length)  # a stalled client times out here (request_timeout)
        index = self.server.current().index
        self.answer_search(parse_qs(url.query), lambda top_k: self.search_image(index, body, top_k))

    def refused_host(self) -> bool:
        """Refuse (403) a request for a Host name this server does not answer: DNS rebinding."""
        reason = host_refusal(self.headers.get("Host"), self.server.allowed_hosts)
        if reason is not None:
            self.close_connection = True
            self.send_json(HTTPStatus.FORBIDDEN, {"error": reason})
        return reason is not None

    def send_page(self, image_count: int) -> None:
        page = page_template().replace("__COUNT__", str(image_count))
        page = page.replace("__MAX_TOP_K__", str(MAX_TOP_K)).replace("__TOP_K__", str(DEFAULT_TOP_K))
        self.page_nonce = new_nonce()
        try:
            page = add_nonce(page, self.page_nonce)
            self.send_body(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
        finally:
            self.page_nonce = None

    def search_text(self, index: RetrievalIndex, query: dict[str, list[str]], top_k: int) -> dict:
        text = query.get("text", [""])[0]
        with self.server.search_lock:
            return results_document(text, index.search_text(text, top_k))

    def search_image(self, index: RetrievalIndex, body: bytes, top_k: int) -> dict:
        with self.server.decode_slots:  # held until the decoded image is searched and dropped
            image = read_uploaded_image(body)
            with self.server.search_lock:
                return results_document("uploaded image", index.search_image(image, top_k))

    def answer_search(self, query: dict[str, list[str]], run) -> None:
        """Run a search and send its JSON; a bad query gets 400 with {"error": ...}."""
        try:
            self.send_json(HTTPStatus.OK, run(parse_top_k(query.get("top_k"))))
        except InputError as error:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})

    def thumbnail(self, path: Path) -> bytes:
        """The thumbnail of `path`, from the cache or decoded in one of the shared decode slots."""
        key = file_key(path)
        thumbnail = self.server.thumbnails.get(key)
        if thumbnail is None:
            with self.server.decode_slots:
                thumbnail = self.server.thumbnails.get(key)  # made while this request waited?
                if thumbnail is None:
                    thumbnail = make_thumbnail(path)
                    self.server.thumbnails.put(key, thumbnail)
        return thumbnail

    def send_thumbnail(self, served: ServedIndex, filename: str) -> None:
        path = served.indexed_file(filename)
        if path is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"not an indexed image: {filename!r}"})
            return
        try:
            thumbnail = self.thumbnail(path)
        except (OSError, ValueError) as error:  # InputError included
            self.send_json(
                HTTPStatus.NOT_FOUND, {"error": f"cannot make a thumbnail of {filename!r} ({error})"}
            )
            return
        self.send_body(HTTPStatus.OK, thumbnail, "image/jpeg", cache=True)

    def send_image(self, served: ServedIndex, filename: str) -> None:
        path = served.indexed_file(filename)
        if path is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"not an indexed image: {filename!r}"})
            return
        try:
            file, size, content_type = open_served_image(path)
        except (OSError, ValueError) as error:  # InputError included
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"cannot serve {filename!r} ({error})"})
            return
        with file:
            self.send_headers(HTTPStatus.OK, size, content_type, cache=True)
            while size > 0 and (chunk := file.read(min(size, SEND_CHUNK_BYTES))):
                self.wfile.write(chunk)
                size -= len(chunk)
        self.close_connection = True  # a file cut short meanwhile leaves the length unmet

    def send_json(self, status: HTTPStatus, document: dict) -> None:
        self.send_body(status, json.dumps(document, ensure_ascii=False).encode("utf-8"), "application/json")

    def send_body(self, status: HTTPStatus, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_headers(status, len(body), content_type, cache)
        self.wfile.write(body)

    def send_headers(self, status: HTTPStatus, length: int, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()

    def end_headers(self) -> None:
        """Every response, http.server's own errors included, gets the security headers."""
        for name, value in security_headers(self.page_nonce).items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(
    index: RetrievalIndex,
    host: str = "127.0.0.1",
    port: int = 8000,
    allowed_hosts: str | list[str] | tuple[str, ...] = (),
) -> None:
    """Serve the search page for `index` until interrupted (Ctrl+C).

    `allowed_hosts`: Host names to answer besides the loopback names and `host` (see RetrievalServer).
    """
    server = RetrievalServer(index, host, port, allowed_hosts=allowed_hosts)
    if host_name(host) not in LOOPBACK_HOSTS:
        print(
            f"warning: listening on {host}: other machines can search this index; they must use one "
            f"of the names {', '.join(sorted(server.allowed_hosts))} (add more with --allowed_hosts)",
            file=sys.stderr,
        )
    print(f"Searching {len(index)} images of {index.directory} at {server.url} (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
