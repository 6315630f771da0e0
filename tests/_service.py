"""Helpers for the search service's tests: a server on a free loopback port, and requests to it.

The service needs the optional [serve] packages (FastAPI, uvicorn); without them the tests that
use these helpers are skipped, and the rest of the test file still runs.
"""

import importlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from component.retrieval.index import RetrievalIndex


def require_serve() -> None:
    """Skip the calling test when FastAPI or uvicorn is missing (pip install '.[serve]')."""
    for name in ("fastapi", "uvicorn"):
        pytest.importorskip(name, reason=f"{name} is missing: the [serve] extra is not installed")


def service_module(name: str = "service"):
    """component.retrieval.<name> (service or server), or a skip without the [serve] packages."""
    require_serve()
    return importlib.import_module(f"component.retrieval.{name}")


def limits(**values):
    """ServiceLimits with `values`, or a skip without the [serve] packages."""
    return service_module("server").ServiceLimits(**values)


@contextmanager
def serving(index_dir: Path, backend: str = "torch", onnx_dir: Path | None = None, **options) -> Iterator:
    """The service for `index_dir` on a free loopback port, served from a thread; `options` go to
    `SearchServer` (allowed_hosts, limits)."""
    search_server = service_module("server").search_server
    index = RetrievalIndex.load(index_dir, device="cpu", memory_map=False)
    server = search_server(index, backend, onnx_dir, host="127.0.0.1", port=0, log_requests=False, **options)
    with server.running_in_thread():
        yield server


def fetch(
    server, path: str, body: bytes | None = None, content_type: str | None = None
) -> tuple[int, bytes, str]:
    """Status, body and content type of a request to the server (POST when there is a body)."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(
        server.url.rstrip("/") + path,
        data=body,
        method="POST" if body is not None else "GET",
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


def write_siglip_checkpoint(
    checkpoint: Path, directory: Path, logit_scale: float = 2.3, logit_bias: float = -4.0
):
    """A copy of `checkpoint` with a logit bias (a SigLIP model) and the given scale, with its processor."""
    from component.model import BertCLIPModel
    from component.processor import load_processor

    model = BertCLIPModel.from_pretrained(checkpoint)
    model.add_logit_bias(logit_scale, logit_bias)
    model.save_pretrained(directory)
    load_processor(checkpoint).save_pretrained(str(directory))
    return directory
