"""The search service (FastAPI on uvicorn) against hostile pages and clients: DNS rebinding (Host
names), a GIF/HTML polyglot in a CSV-built index, security headers, bounded and cached thumbnail
decoding, stalled clients and too many connections. Everything runs on 127.0.0.1, each wait bounded."""

import http.client
import io
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
from _service import serving
from PIL import Image
from test_retrieval import draw_images

from component.errors import InputError
from component.retrieval import service as retrieval_service
from component.retrieval.images import images_in_csv
from component.retrieval.index import RetrievalIndex
from component.retrieval.server import SearchServer, ServiceLimits
from component.retrieval.web import ThumbnailCache, allowed_host_names, host_name, host_refusal

IMAGE_NAMES = ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "f.png"]
SCRIPT = b"<html><script>alert(document.domain)</script></html>"


def gif_html_polyglot() -> bytes:
    """A valid GIF whose bytes also hold a script: as text/html a browser would run it."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "GIF")
    return buffer.getvalue() + SCRIPT


def ppm_html_polyglot() -> bytes:
    """A valid PPM (a type no browser shows) that also holds a script."""
    return b"P6\n2 2\n255\n" + bytes(range(12)) + SCRIPT


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """A CSV-built index of drawn images and two polyglots named .html."""
    root = tmp_path_factory.mktemp("security")
    images = root / "images"
    draw_images(images, IMAGE_NAMES)
    (images / "page.html").write_bytes(gif_html_polyglot())
    (images / "sheet.html").write_bytes(ppm_html_polyglot())
    names = [*IMAGE_NAMES, "page.html", "sheet.html"]
    (root / "pairs.csv").write_text("text,filename\n" + "".join(f"图片,{name}\n" for name in names), "utf-8")
    source = images_in_csv(root / "pairs.csv", images)
    index = RetrievalIndex.build(tiny_checkpoint, root / "index", source, device="cpu")
    assert sorted(index.metadata["filename"]) == sorted(names)  # the polyglots are indexed
    return root / "index"


@pytest.fixture(scope="module")
def server(index_dir):
    with serving(index_dir) as server:
        yield server


def port(server: SearchServer) -> int:
    return server.port


def request(
    server: SearchServer,
    path: str,
    host: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Status, headers and body of a request, sent with the Host header `host` when given."""
    connection = http.client.HTTPConnection("127.0.0.1", port(server), timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def raw_exchange(server: SearchServer, data: bytes) -> bytes:
    """What the server answers to bytes sent as they are, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as client:
        client.sendall(data)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# --- B1: DNS rebinding ---


PATHS = [
    "/",
    "/docs",
    "/healthz",
    "/openapi.json",
    "/api/search?q=" + quote("猫"),
    "/image?path=a.png",
    "/thumbnail?path=a.png",
]


@pytest.mark.parametrize("path", PATHS)
def test_an_unknown_host_name_is_refused_without_data(server, path):
    status, headers, body = request(server, path, host=f"evil.example:{port(server)}")
    assert (status, headers["Content-Type"]) == (403, "application/json")
    assert json.loads(body) == {
        "error": "host 'evil.example' is not served here; start the server with --allowed_hosts "
        "evil.example to serve it"
    }


def test_a_request_without_a_host_header_is_refused(server):
    assert raw_exchange(server, b"GET /api/search?q=x HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 403")


LOOPBACK_HOSTS = ["localhost:{port}", "127.0.0.1:{port}", "LOCALHOST", "[::1]:1234", "localhost."]


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_loopback_names_with_any_port_are_answered(server, host):
    status, _, body = request(server, "/", host=host.format(port=port(server)))
    assert status == 200 and b'id="query"' in body


def test_allowed_hosts_adds_names(index_dir):
    with serving(index_dir, allowed_hosts="photos.lan, Other.Example:8000") as server:
        assert request(server, "/", host=f"photos.lan:{port(server)}")[0] == 200
        assert request(server, "/", host="other.example")[0] == 200
        assert request(server, "/", host="localhost")[0] == 200
        assert request(server, "/", host="evil.example")[0] == 403


@pytest.mark.parametrize(
    ("host", "name"),
    [("LocalHost:8000", "localhost"), ("[::1]:80", "[::1]"), ("::1", "[::1]"), ("a.lan.", "a.lan")],
)
def test_host_names_drop_port_case_and_trailing_dot(host, name):
    assert host_name(host) == name


def test_host_policy():
    allowed = allowed_host_names("0.0.0.0", "photos.lan")
    assert allowed == {"localhost", "127.0.0.1", "[::1]", "0.0.0.0", "photos.lan"}
    assert host_refusal("photos.lan:8000", allowed) is None
    assert "evil.example" in host_refusal("evil.example", allowed)
    assert host_refusal(None, allowed) == "a Host header is required"
    assert host_refusal("evil.example", allowed_host_names("127.0.0.1", ["*"])) is None


# --- B2: what a file is served as ---


def test_a_gif_html_polyglot_named_html_is_served_as_a_gif(server, index_dir):
    status, headers, body = request(server, "/image?path=page.html")
    assert (status, headers["Content-Type"]) == (200, "image/gif")
    assert body == gif_html_polyglot()
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]


def test_an_image_of_a_type_no_browser_shows_is_refused_but_has_a_thumbnail(server):
    status, headers, body = request(server, "/image?path=sheet.html")
    assert (status, headers["Content-Type"]) == (404, "application/json")
    error = json.loads(body)["error"]
    assert error == "cannot serve 'sheet.html' (a PPM image is served only as a thumbnail)"
    status, headers, body = request(server, "/thumbnail?path=sheet.html")
    assert (status, headers["Content-Type"]) == (200, "image/jpeg")
    assert Image.open(io.BytesIO(body)).format == "JPEG"


def test_images_are_typed_by_content_not_by_name(server, index_dir):
    for name, content_type in [("a.png", "image/png"), ("b.jpg", "image/jpeg")]:
        status, headers, _ = request(server, "/image?path=" + name)
        assert (status, headers["Content-Type"]) == (200, content_type)


RESPONSES = {
    "page": ("GET", "/", None),
    "search": ("GET", "/api/search?q=" + quote("猫"), None),
    "bad query": ("GET", "/api/search?q=x&top_k=0", None),
    "bad body": ("POST", "/api/embed", b"{not json"),
    "docs": ("GET", "/docs", None),
    "schema": ("GET", "/openapi.json", None),
    "image": ("GET", "/image?path=page.html", None),
    "thumbnail": ("GET", "/thumbnail?path=a.png", None),
    "not found": ("GET", "/nothing", None),
    "not indexed": ("GET", "/image?path=../secret.png", None),
    "upload": ("POST", "/api/search_image", b"not an image"),
    "no method": ("PUT", "/", b"x"),  # FastAPI's own 405
}


@pytest.mark.parametrize("name", RESPONSES)
def test_every_response_has_nosniff_and_a_content_security_policy(server, name):
    method, path, body = RESPONSES[name]
    _, headers, _ = request(server, path, method=method, body=body)
    assert headers["X-Content-Type-Options"] == "nosniff"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["Cross-Origin-Resource-Policy"] == "same-origin"


def test_a_bad_request_line_and_a_refused_host_have_the_headers_too(server):
    bad_request = raw_exchange(server, b"GET / extra HTTP/1.1\r\nHost: localhost\r\n\r\n").decode("latin-1")
    assert bad_request.startswith("HTTP/1.1 400") and bad_request.endswith(
        '{"error": "Invalid HTTP request received."}'
    )
    refused = request(server, "/", host="evil.example")[1].as_string()
    for answer in (bad_request.lower(), refused.lower()):  # header names are case-insensitive
        assert "x-content-type-options: nosniff" in answer
        assert "content-security-policy: default-src 'none'" in answer


def test_a_body_over_the_limit_is_refused_from_its_length_unread_with_the_headers(server):
    answer = raw_exchange(
        server, b"POST /api/search_image HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30000000\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"x-content-type-options: nosniff" in answer
    assert answer.endswith(b'{"error": "the request body is over 20971520 bytes"}')


def test_the_page_runs_only_its_own_inline_script_and_style_by_a_fresh_nonce(server):
    nonces = []
    for _ in range(2):
        _, headers, body = request(server, "/")
        nonce = re.fullmatch(r".*script-src 'nonce-([\w-]+)'.*", headers["Content-Security-Policy"]).group(1)
        assert f"style-src 'nonce-{nonce}'" in headers["Content-Security-Policy"]
        page = body.decode("utf-8")
        assert page.count(f'<script nonce="{nonce}">') == 1 and page.count("<script") == 1
        assert page.count(f'<style nonce="{nonce}">') == 1 and page.count("<style") == 1
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


# --- B3: thumbnails ---


@contextmanager
def counted_decoding(monkeypatch, delay: float = 0.0):
    """Count decodes of thumbnails and uploads, and the most running at once."""
    counts = {"thumbnails": 0, "uploads": 0, "running": 0, "most": 0}
    lock = threading.Lock()
    real_make_thumbnail = retrieval_service.make_thumbnail

    @contextmanager
    def decoding(kind: str):
        with lock:
            counts[kind] += 1
            counts["running"] += 1
            counts["most"] = max(counts["most"], counts["running"])
        try:
            time.sleep(delay)
            yield
        finally:
            with lock:
                counts["running"] -= 1

    def make_thumbnail(path):
        with decoding("thumbnails"):
            return real_make_thumbnail(path)

    def read_uploaded_image(body):
        with decoding("uploads"):
            raise InputError("not searched")

    monkeypatch.setattr(retrieval_service, "make_thumbnail", make_thumbnail)
    monkeypatch.setattr(retrieval_service, "read_uploaded_image", read_uploaded_image)
    yield counts


def test_thumbnails_and_uploads_share_the_bound_on_decodes_at_once(index_dir, monkeypatch):
    statuses = []
    requests = [("GET", f"/thumbnail?path={name}", None) for name in IMAGE_NAMES]
    requests += [("POST", "/api/search_image", b"x")] * 3
    with serving(index_dir) as server, counted_decoding(monkeypatch, delay=0.2) as counts:

        def send(method: str, path: str, body: bytes | None) -> None:
            statuses.append(request(server, path, method=method, body=body)[0])

        clients = [threading.Thread(target=send, args=one) for one in requests]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
    assert sorted(statuses) == [200] * len(IMAGE_NAMES) + [400] * 3
    assert (counts["thumbnails"], counts["uploads"]) == (len(IMAGE_NAMES), 3)
    assert counts["most"] == retrieval_service.IMAGES_DECODED_AT_ONCE


def test_a_second_thumbnail_request_is_served_from_the_cache(index_dir, monkeypatch):
    path = RetrievalIndex.load(index_dir).image_root / "c.png"
    with serving(index_dir) as server, counted_decoding(monkeypatch) as counts:
        first = request(server, "/thumbnail?path=c.png")
        second = request(server, "/thumbnail?path=c.png")
        assert counts["thumbnails"] == 1
        assert first[0] == second[0] == 200 and first[2] == second[2]
        status = path.stat()
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))  # a rewritten file
        assert request(server, "/thumbnail?path=c.png")[0] == 200
        assert counts["thumbnails"] == 2


def test_the_thumbnail_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = ThumbnailCache(max_bytes=10)
    cache.put(("a", 1, 1), b"aaaa")
    cache.put(("b", 1, 1), b"bbbb")
    assert cache.get(("a", 1, 1)) == b"aaaa"  # now the most recently used
    cache.put(("c", 1, 1), b"cccc")
    assert cache.get(("b", 1, 1)) is None and cache.get(("a", 1, 1)) == b"aaaa"
    assert cache.total_bytes == 8 and len(cache) == 2
    cache.put(("d", 1, 1), b"d" * 11)  # larger than the whole budget: not kept
    assert cache.get(("d", 1, 1)) is None and cache.total_bytes == 8


# --- B4: stalled clients ---


def test_a_stalled_upload_is_answered_408_and_closed_after_the_timeout_while_others_are_served(index_dir):
    with serving(index_dir, limits=ServiceLimits(request_timeout=1.0)) as server:
        stalled = socket.create_connection(("127.0.0.1", port(server)), timeout=10)
        with stalled:
            started = time.monotonic()
            stalled.sendall(
                b"POST /api/search_image HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
            )  # and never the body
            assert request(server, "/")[0] == 200  # served meanwhile
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
            waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"x-content-type-options: nosniff" in answer
    assert answer.endswith(b'{"error": "the request body stalled for 1 s"}')
    assert 0.9 < waited < 5


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: local"], ids=["nothing", "half a head"])
def test_a_connection_without_a_whole_request_is_closed_after_the_timeout(index_dir, sent):
    with serving(index_dir, limits=ServiceLimits(request_timeout=1.0)) as server:
        with socket.create_connection(("127.0.0.1", port(server)), timeout=10) as idle:
            started = time.monotonic()
            idle.sendall(sent)
            assert request(server, "/")[0] == 200  # served meanwhile
            assert idle.recv(65536) == b""  # dropped, with no answer
            waited = time.monotonic() - started
    assert 0.9 < waited < 5


def test_connections_over_the_limit_are_answered_503(index_dir):
    with serving(index_dir, limits=ServiceLimits(request_timeout=5.0, max_connections=2)) as server:
        idle = [socket.create_connection(("127.0.0.1", port(server)), timeout=10) for _ in range(2)]
        time.sleep(0.5)  # both accepted, each holding a slot while it waits for a request
        answer = raw_exchange(server, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"x-content-type-options: nosniff" in answer
        for connection in idle:
            connection.close()  # their slots are freed
        deadline = time.monotonic() + 5
        while request(server, "/")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert request(server, "/")[0] == 200
