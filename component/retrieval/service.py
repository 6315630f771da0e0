"""The search service's FastAPI application: the page, the JSON API, indexed images and thumbnails.

    GET  /                       the search page (page.html): a text box and an image upload
    GET  /docs                   the API reference, rendered offline from /openapi.json (docs.html)
    GET  /healthz                what is served: image count, index generation, backend
    GET  /api/search?q=T&top_k=K the indexed images most similar to a text, best first
    POST /api/search_image?top_k=K  the same for the image file sent as the request body
    POST /api/embed              texts and/or base64 images in, L2-normalised embeddings out
    POST /api/similarity         image-text, text-text or image-image scores, as predict_similarity.py
    GET  /thumbnail?path=F       a JPEG thumbnail (at most 256 px a side) of an indexed image
    GET  /image?path=F           an indexed image file itself, typed by its content

Handlers are plain functions, run by FastAPI in its thread pool: model forwards run one at a time
(`search_lock`), image decodes a few at a time (`decode_slots`, shared by uploads and thumbnails).
Host names, security headers, body size limits and the body timeout are ASGI middleware around
this application (component.retrieval.asgi_policies); the HTTP server is uvicorn
(component.retrieval.server).
"""

import threading
from functools import cache
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from component.encoding import match_probabilities, probability_kind, score_embeddings, scores_document
from component.errors import InputError
from component.retrieval.api_models import (
    DEFAULT_TOP_K,
    MAX_TEXT_CHARS,
    MAX_TOP_K,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    Health,
    SearchResponse,
    SimilarityRequest,
    SimilarityResponse,
)
from component.retrieval.index import SearchResult, results_document
from component.retrieval.query_encoders import QueryEncoder
from component.retrieval.served_images import make_thumbnail, open_served_image, read_uploaded_image
from component.retrieval.served_index import IndexReloader, ServedIndex
from component.retrieval.web import ThumbnailCache, add_nonce, file_key, new_nonce, page_policy

IMAGES_DECODED_AT_ONCE = 2  # uploads and thumbnails decoded at once: bounds their memory
THUMBNAIL_CACHE_BYTES = 32 * 1024 * 1024  # some 2,000 thumbnails
SEND_CHUNK_BYTES = 1024 * 1024
PAGE_FILE = Path(__file__).with_name("page.html")
DOCS_FILE = Path(__file__).with_name("docs.html")
TopKQuery = Annotated[int, Query(ge=1, le=MAX_TOP_K, description=f"results, 1 to {MAX_TOP_K}")]
ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 422)}


@cache
def resource_text(path: Path) -> str:
    """A static page shipped beside this module."""
    return path.read_text(encoding="utf-8")


class ServiceState:
    """What every request shares: the index (reloaded when replaced), the encoder, locks and caches."""

    def __init__(self, reloader: IndexReloader, encoder: QueryEncoder):
        self.reloader = reloader
        self.encoder = encoder
        self.search_lock = threading.Lock()  # one model forward at a time
        self.decode_slots = threading.BoundedSemaphore(IMAGES_DECODED_AT_ONCE)
        self.thumbnails = ThumbnailCache(THUMBNAIL_CACHE_BYTES)

    def probability_of(self, cosine: float) -> float | None:
        """A search result's sigmoid match probability for a SigLIP model; None for a CLIP model."""
        if self.encoder.logit_bias is None:
            return None  # a softmax needs all candidates: a top-k list has no meaningful one
        cosine_matrix = torch.tensor([[cosine]])
        return float(match_probabilities(cosine_matrix, self.encoder.logit_scale, self.encoder.logit_bias))

    def search(self, query: str, embed: np.ndarray, top_k: int) -> dict:
        """The results document for an encoded query, with probabilities for a SigLIP model."""
        results: list[SearchResult] = self.reloader.current().index.search_embedding(embed, top_k)
        document = results_document(query, results)
        if self.encoder.logit_bias is not None:
            for item in document["results"]:
                item["probability"] = self.probability_of(item["score"])
        return document

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        with self.search_lock:
            return self.encoder.encode_texts(texts)

    def decode_and_encode(self, files: list[bytes]) -> np.ndarray:
        """Embeddings of image files, each decoded in a decode slot (pixel limit before decoding)."""
        embeds = []
        for data in files:
            with self.decode_slots:  # held until the decoded image is encoded and dropped
                image: Image.Image = read_uploaded_image(data)
                with self.search_lock:
                    embeds.append(self.encoder.encode_images([image]))
        return np.concatenate(embeds)

    def thumbnail(self, path: Path) -> bytes:
        """The thumbnail of `path`, from the cache or decoded in one of the shared decode slots."""
        key = file_key(path)
        thumbnail = self.thumbnails.get(key)
        if thumbnail is None:
            with self.decode_slots:
                thumbnail = self.thumbnails.get(key)  # made while this request waited?
                if thumbnail is None:
                    thumbnail = make_thumbnail(path)
                    self.thumbnails.put(key, thumbnail)
        return thumbnail


def error(status: int, message: str) -> JSONResponse:
    """A JSON error answer."""
    return JSONResponse({"error": message}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    """The first validation error as one line: where it is and what is wrong."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'cannot parse it')})"
    message = str(first["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    return f"{where}: {message}" if where else message


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal is JSON {"error": ...}: validation (422), bad input (400), HTTP errors."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if exc.status_code != 404 else f"no such page: {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def page_response(template: str, nonce: str, replacements: dict[str, str]) -> HTMLResponse:
    """A static page with its placeholders filled, its inline script and style allowed by `nonce`."""
    for name, value in replacements.items():
        template = template.replace(name, value)
    headers = {"Content-Security-Policy": page_policy(nonce), "Cache-Control": "no-store"}
    return HTMLResponse(add_nonce(template, nonce), headers=headers)


def add_pages(app: FastAPI, state: ServiceState) -> None:
    """The search page, the API reference and the health check."""

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        count = len(state.reloader.current().index)
        values = {"__COUNT__": str(count), "__MAX_TOP_K__": str(MAX_TOP_K), "__TOP_K__": str(DEFAULT_TOP_K)}
        return page_response(resource_text(PAGE_FILE), new_nonce(), values)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return page_response(resource_text(DOCS_FILE), new_nonce(), {})

    @app.get("/healthz", response_model=Health, summary="What the service is serving")
    def healthz() -> dict:
        index = state.reloader.current().index
        kind = probability_kind(state.encoder.logit_bias)
        backend = state.encoder.backend
        return {"status": "ok", "images": len(index), "generation": index.info.generation, "backend": backend,
                "probability": kind}  # fmt: skip


def add_search(app: FastAPI, state: ServiceState) -> None:
    """Search by text and by an uploaded image."""

    @app.get(
        "/api/search",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="The indexed images most similar to a text",
    )
    def search(
        q: Annotated[str, Query(min_length=1, max_length=MAX_TEXT_CHARS, description="the query text")],
        top_k: TopKQuery = DEFAULT_TOP_K,
    ) -> dict:
        if not q.strip():
            raise InputError("the query text is empty")
        return state.search(q, state.encode_texts([q])[0], top_k)

    @app.post(
        "/api/search_image",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="The indexed images most similar to an image (the file itself as the body)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def search_image(request: Request, top_k: TopKQuery = DEFAULT_TOP_K) -> dict:
        body = await request.body()  # the size limit and timeout are the middleware's
        if not body:
            raise InputError("send one image file as the request body")
        embed = await run_in_threadpool(state.decode_and_encode, [body])
        return await run_in_threadpool(state.search, "uploaded image", embed[0], top_k)


def add_encoding(app: FastAPI, state: ServiceState) -> None:
    """Embeddings and similarity scores."""

    @app.post("/api/embed", response_model=EmbedResponse, responses=ERRORS, summary="Embed texts and images")
    def embed(request: EmbedRequest) -> dict:
        texts = state.encode_texts(request.texts) if request.texts else np.empty((0, 0))
        images = state.decode_and_encode(request.images) if request.images else np.empty((0, 0))
        dim = max(texts.shape[1], images.shape[1])
        return {"dim": dim, "backend": state.encoder.backend, "text_embeds": texts.tolist(),
                "image_embeds": images.tolist()}  # fmt: skip

    @app.post(
        "/api/similarity",
        response_model=SimilarityResponse,
        responses=ERRORS,
        summary="Image-text, text-text or image-image scores, as predict_similarity.py gives them",
    )
    def similarity(request: SimilarityRequest) -> dict:
        mode = similarity_mode(request)
        names = [f"image {number}" for number in range(len(request.images))]
        texts = torch.from_numpy(state.encode_texts(request.texts)) if request.texts else None
        images = torch.from_numpy(state.decode_and_encode(request.images)) if request.images else None
        if mode == "image-text":
            queries, candidates = (names, images), (request.texts, texts)
        elif mode == "text-text":
            queries = candidates = (request.texts, texts)
        else:
            queries = candidates = (names, images)
        encoder = state.encoder
        scale, bias = encoder.logit_scale, encoder.logit_bias
        scores = score_embeddings(mode, queries[0], candidates[0], queries[1], candidates[1], scale, bias)
        return scores_document(scores, request.top_k)


def similarity_mode(request: SimilarityRequest) -> str:
    """The mode asked for or implied by the inputs; InputError when the inputs do not fit it."""
    texts, images = len(request.texts), len(request.images)
    mode = request.mode or ("image-text" if texts and images else "text-text" if texts else "image-image")
    if mode == "image-text" and not (texts and images):
        raise InputError("image-text mode needs images and texts")
    if mode == "text-text" and (images or texts < 2):
        raise InputError("text-text mode needs at least 2 texts and no images")
    if mode == "image-image" and (texts or images < 2):
        raise InputError("image-image mode needs at least 2 images and no texts")
    return mode


def add_files(app: FastAPI, state: ServiceState) -> None:
    """Indexed images and their thumbnails; nothing else on disk is ever served."""

    def indexed(served: ServedIndex, path: str) -> Path:
        file = served.indexed_file(path)
        if file is None:
            raise LookupError(f"not an indexed image: {path!r}")
        return file

    @app.get("/thumbnail", include_in_schema=False)
    def thumbnail(path: str = "") -> Response:
        try:
            file = indexed(state.reloader.current(), path)
        except LookupError as why:
            return error(404, str(why))
        try:
            data = state.thumbnail(file)
        except (OSError, ValueError) as why:  # InputError included
            return error(404, f"cannot make a thumbnail of {path!r} ({why})")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/image", include_in_schema=False)
    def image(path: str = "") -> Response:
        try:
            file, size, content_type = open_served_image(indexed(state.reloader.current(), path))
        except LookupError as why:
            return error(404, str(why))
        except (OSError, ValueError) as why:  # InputError included
            return error(404, f"cannot serve {path!r} ({why})")
        headers = {"Content-Length": str(size), "Cache-Control": "max-age=3600"}
        return StreamingResponse(file_chunks(file, size), media_type=content_type, headers=headers)


def file_chunks(file, size: int):
    """At most `size` bytes of an open file, in chunks; the file is closed at the end."""
    with file:
        while size > 0 and (chunk := file.read(min(size, SEND_CHUNK_BYTES))):
            size -= len(chunk)
            yield chunk


def create_app(state: ServiceState) -> FastAPI:
    """The FastAPI application for `state`; /docs is our offline page, so FastAPI's own is off."""
    app = FastAPI(
        title="Chinese CLIP image search",
        summary="Search an image index by text or image, embed and score texts and images.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    add_error_handlers(app)
    add_pages(app, state)
    add_search(app, state)
    add_encoding(app, state)
    add_files(app, state)
    return app
