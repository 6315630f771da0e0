"""A search page for a retrieval index, served by the standard library's http.server.

    GET  /                             the page: a text box and an image upload, results as thumbnails
    GET  /api/search?text=T&top_k=K    {"query": T, "results": [{"filename", "score", ...}]}, best first
    POST /api/search_image?top_k=K     the same for the image file sent as the request body
    GET  /thumbnail?path=F             a JPEG thumbnail (at most 256 px a side) of an indexed image
    GET  /image?path=F                 an indexed image file itself

Only files that the index lists and that lie under its image root are served. Uploads and
thumbnails of more than MAX_IMAGE_PIXELS pixels are refused before they are decoded. A later
index run into the same directory is picked up by the next request, without a restart.
"""

import json
import mimetypes
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageOps

from component.encoding import InputError
from component.retrieval import RetrievalIndex, results_document
from component.retrieval_store import read_info_stamp
from datatools.image_check import DEFAULT_MAX_PIXELS

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_TOP_K = 100
DEFAULT_TOP_K = 12
THUMBNAIL_SIDE = 256
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # a larger image would take 3 bytes a pixel, or more, to decode
UPLOADS_DECODED_AT_ONCE = 2  # uploads decoded or searched at once: bounds their memory
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

PAGE = """<!doctype html>
<html lang="zh">
<head>
<meta charset="utf-8">
<title>Image search</title>
<style>
  body { font-family: sans-serif; margin: 1.5rem; }
  form, .upload { display: flex; gap: 0.5rem; align-items: center; margin-bottom: 0.75rem; }
  #query { flex: 1; font-size: 1.1rem; padding: 0.3rem; }
  #top_k { width: 4rem; }
  #results { display: flex; flex-wrap: wrap; gap: 0.75rem; }
  figure { margin: 0; width: 200px; }
  figure img { width: 200px; height: 200px; object-fit: contain; background: #eee; }
  figcaption { font-size: 0.8rem; overflow-wrap: anywhere; }
</style>
</head>
<body>
<h1>Image search</h1>
<p>__COUNT__ images indexed.</p>
<form id="text-form">
  <input id="query" type="search" placeholder="输入描述，例如：一只在草地上奔跑的狗" autofocus>
  <label>top <input id="top_k" type="number" min="1" max="__MAX_TOP_K__" value="__TOP_K__"></label>
  <button type="submit">Search</button>
</form>
<div class="upload">
  <label>or search by image: <input id="image-query" type="file" accept="image/*"></label>
</div>
<p id="status"></p>
<div id="results"></div>
<script>
const resultsBox = document.getElementById("results");
const statusLine = document.getElementById("status");
const topK = document.getElementById("top_k");
let latest = 0;

function render(results) {
  resultsBox.replaceChildren(...results.map((result, rank) => {
    const figure = document.createElement("figure");
    figure.className = "result";
    figure.dataset.filename = result.filename;
    figure.dataset.score = result.score;
    const link = document.createElement("a");
    link.href = "/image?path=" + encodeURIComponent(result.filename);
    link.target = "_blank";
    const image = document.createElement("img");
    image.src = "/thumbnail?path=" + encodeURIComponent(result.filename);
    image.alt = result.filename;
    link.append(image);
    const caption = document.createElement("figcaption");
    const text = result.text === undefined ? "" : " " + result.text;
    caption.textContent = `${rank + 1}. ${result.score.toFixed(4)} ${result.filename}${text}`;
    figure.append(link, caption);
    return figure;
  }));
}

async function search(request, label) {
  const id = ++latest;
  const started = performance.now();
  statusLine.textContent = "Searching…";
  try {
    const response = await request;
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    if (id !== latest) return;  // a newer search has started
    render(answer.results);
    const elapsed = Math.round(performance.now() - started);
    statusLine.textContent = `${answer.results.length} results for ${label} in ${elapsed} ms`;
  } catch (error) {
    if (id !== latest) return;
    resultsBox.replaceChildren();
    statusLine.textContent = "Error: " + error.message;
  }
}

document.getElementById("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = document.getElementById("query").value.trim();
  if (!text) return;
  const url = `/api/search?text=${encodeURIComponent(text)}&top_k=${encodeURIComponent(topK.value)}`;
  search(fetch(url), `“${text}”`);
});

document.getElementById("image-query").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const url = `/api/search_image?top_k=${encodeURIComponent(topK.value)}`;
  search(fetch(url, { method: "POST", body: file }), file.name);
});
</script>
</body>
</html>
"""


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


def open_image_within(
    source: Path | BytesIO, max_pixels: int = MAX_IMAGE_PIXELS, draft_side: int | None = None
) -> Image.Image:
    """An image opened (its header read, no pixels decoded), refused with InputError when it has
    more than `max_pixels` pixels.

    Args:
        draft_side: first set a JPEG to decode at the smallest scale (down to 1/8) that still covers
            draft_side x draft_side; the pixels at that scale are what count.
    """
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as error:  # over twice Pillow's own limit
        raise InputError(f"image too large: {error}") from None
    if draft_side is not None:
        image.draft("RGB", (draft_side, draft_side))
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InputError(f"image too large: {width} x {height} pixels, the limit is {max_pixels}")
    return image


def make_thumbnail(path: Path, side: int = THUMBNAIL_SIDE, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """A JPEG of the image scaled to fit in side x side, upright (EXIF orientation applied).

    An image of more than `max_pixels` pixels is refused (InputError) undecoded; a JPEG counts at
    the reduced scale it decodes at, so a large photo still gets its thumbnail.
    """
    with open_image_within(path, max_pixels, draft_side=side) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    image.thumbnail((side, side))
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def read_uploaded_image(body: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An uploaded image file, decoded, upright and RGB; InputError for a file that is not an image
    or has more than `max_pixels` pixels."""
    try:
        with open_image_within(BytesIO(body), max_pixels) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except InputError:
        raise  # already says what is wrong
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the uploaded image ({error})") from error


@dataclass(frozen=True)
class ServedIndex:
    """An index and what the server derives from it, replaced as one when the index is reloaded."""

    index: RetrievalIndex
    filenames: frozenset[str]
    image_root: Path

    @classmethod
    def of(cls, index: RetrievalIndex) -> "ServedIndex":
        """The index with its set of filenames and its resolved image root."""
        return cls(index, frozenset(index.metadata["filename"]), index.image_root.resolve())

    def indexed_file(self, filename: str) -> Path | None:
        """The file of an indexed image, or None when `filename` is not one or lies outside the root."""
        if filename not in self.filenames:
            return None
        path = (self.image_root / filename).resolve()
        return path if path.is_relative_to(self.image_root) and path.is_file() else None


def reopen(index: RetrievalIndex) -> RetrievalIndex:
    """The index directory of `index` opened again, read into memory, sharing its loaded model."""
    new_index = RetrievalIndex.load(index.directory, index.model_name_or_path, index.device, memory_map=False)
    if new_index.info.model_fingerprint != index.info.model_fingerprint:
        raise InputError(
            f"it was rebuilt with another model ({new_index.info.model_name_or_path}); "
            "restart the server to search it"
        )
    new_index.model, new_index.processor = index.model, index.processor
    return new_index


class RetrievalServer(ThreadingHTTPServer):
    """The search page's HTTP server; each request runs in its own thread, queries one at a time.

    Each request first compares the index's index.json with the one it was opened from (one stat
    call); after an index run has replaced it, the index is opened again and swapped in.
    """

    daemon_threads = True

    def __init__(
        self, index: RetrievalIndex, host: str = "127.0.0.1", port: int = 0, log_requests: bool = True
    ):
        try:
            super().__init__((host, port), RetrievalRequestHandler)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error})") from error
        self.served = ServedIndex.of(index)
        self.tried_stamp = index.info_stamp  # of the last index.json opened or tried
        self.reload_lock = threading.Lock()
        self.search_lock = threading.Lock()  # one model forward at a time
        self.upload_slots = threading.BoundedSemaphore(UPLOADS_DECODED_AT_ONCE)
        self.log_requests = log_requests

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def current(self) -> ServedIndex:
        """The index to answer a request from, reloaded first when an index run has replaced it.

        While one request reloads, the others are answered from the index in use.
        """
        served = self.served
        stamp = read_info_stamp(served.index.directory)
        if stamp == self.tried_stamp or not self.reload_lock.acquire(blocking=False):
            return served
        try:
            if stamp != self.tried_stamp:  # not reloaded by another request meanwhile
                self.tried_stamp = stamp
                self.reload(self.served.index)
            return self.served
        finally:
            self.reload_lock.release()

    def reload(self, index: RetrievalIndex) -> None:
        """Swap in the index directory's current index; on any error keep `index` and say why."""
        try:
            new_index = reopen(index)
        except Exception as error:  # whatever went wrong, the index in use still answers
            print(
                f"warning: cannot reload {index.directory} ({error}); still serving its "
                f"{len(index)} images of generation {index.info.generation}",
                file=sys.stderr,
                flush=True,
            )
            return
        self.served = ServedIndex.of(new_index)
        print(
            f"reloaded {index.directory}: {len(new_index)} images, generation {new_index.info.generation}",
            file=sys.stderr,
            flush=True,
        )


class RetrievalRequestHandler(BaseHTTPRequestHandler):
    """The page, the two search endpoints, and indexed images with their thumbnails."""

    server: RetrievalServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        served = self.server.current()
        if url.path == "/":
            page = PAGE.replace("__COUNT__", str(len(served.index)))
            page = page.replace("__MAX_TOP_K__", str(MAX_TOP_K)).replace("__TOP_K__", str(DEFAULT_TOP_K))
            self.send_body(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
        elif url.path == "/api/search":
            self.answer_search(query, lambda top_k: self.search_text(served.index, query, top_k))
        elif url.path in ("/thumbnail", "/image"):
            self.send_image(served, query.get("path", [""])[0], thumbnail=url.path == "/thumbnail")
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:
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
        body = self.rfile.read(length)
        index = self.server.current().index
        self.answer_search(parse_qs(url.query), lambda top_k: self.search_image(index, body, top_k))

    def search_text(self, index: RetrievalIndex, query: dict[str, list[str]], top_k: int) -> dict:
        text = query.get("text", [""])[0]
        with self.server.search_lock:
            return results_document(text, index.search_text(text, top_k))

    def search_image(self, index: RetrievalIndex, body: bytes, top_k: int) -> dict:
        with self.server.upload_slots:  # held until the decoded image is searched and dropped
            image = read_uploaded_image(body)
            with self.server.search_lock:
                return results_document("uploaded image", index.search_image(image, top_k))

    def answer_search(self, query: dict[str, list[str]], run) -> None:
        """Run a search and send its JSON; a bad query gets 400 with {"error": ...}."""
        try:
            self.send_json(HTTPStatus.OK, run(parse_top_k(query.get("top_k"))))
        except InputError as error:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})

    def send_image(self, served: ServedIndex, filename: str, thumbnail: bool) -> None:
        path = served.indexed_file(filename)
        if path is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"not an indexed image: {filename!r}"})
            return
        try:
            body = make_thumbnail(path) if thumbnail else path.read_bytes()
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # InputError included
            action = "make a thumbnail of" if thumbnail else "read"
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"cannot {action} {filename!r} ({error})"})
            return
        content_type = "image/jpeg" if thumbnail else mimetypes.guess_type(path.name)[0]
        self.send_body(HTTPStatus.OK, body, content_type or "application/octet-stream", cache=True)

    def send_json(self, status: HTTPStatus, document: dict) -> None:
        self.send_body(status, json.dumps(document, ensure_ascii=False).encode("utf-8"), "application/json")

    def send_body(self, status: HTTPStatus, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(index: RetrievalIndex, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the search page for `index` until interrupted (Ctrl+C)."""
    server = RetrievalServer(index, host, port)
    if host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {host}: other machines can search this index", file=sys.stderr)
    print(f"Searching {len(index)} images of {index.directory} at {server.url} (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
