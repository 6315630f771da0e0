"""The search service's JSON API against the Python API: every endpoint, the OpenAPI schema, bad
input (4xx with a JSON reason, never a 500), SigLIP probabilities, and 200 requests from 16 threads."""

import base64
import json
import math
import re
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
from _service import fetch, limits, serving, write_siglip_checkpoint
from test_retrieval import draw_images

import predict_similarity
import retrieval
from component.encoding import encode_images, encode_texts
from component.retrieval.api_models import MAX_IMAGES, MAX_TEXTS, MAX_TOP_K
from component.retrieval.images import images_in_directory
from component.retrieval.index import RetrievalIndex, results_document
from component.retrieval.server import SearchServer

NAMES = ["a.png", "b.png", "c.png", "d.jpg", "e.png"]
TEXTS = ["一只猫", "红色的汽车停在路边", "蓝天白云"]
ENDPOINTS = {
    "/healthz": {"get"},
    "/api/search": {"get"},
    "/api/search_image": {"post"},
    "/api/embed": {"post"},
    "/api/similarity": {"post"},
}


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("service")
    draw_images(root / "images", NAMES)
    RetrievalIndex.build(tiny_checkpoint, root / "index", images_in_directory(root / "images"), device="cpu")
    return root / "index"


@pytest.fixture(scope="module")
def images(index_dir) -> Path:
    return RetrievalIndex.load(index_dir).image_root


@pytest.fixture(scope="module")
def index(index_dir) -> RetrievalIndex:
    """The Python API's view of the index, with its model loaded: the reference."""
    index = RetrievalIndex.load(index_dir, device="cpu")
    index.load_model()
    return index


@pytest.fixture(scope="module")
def server(index_dir):
    with serving(index_dir) as server:
        yield server


def post_json(server, path: str, document: dict) -> tuple[int, dict]:
    status, body, content_type = fetch(server, path, json.dumps(document).encode(), "application/json")
    assert content_type == "application/json"
    return status, json.loads(body)


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same_results(got: dict, expected: dict) -> None:
    assert got["query"] == expected["query"]
    assert [item["filename"] for item in got["results"]] == [item["filename"] for item in expected["results"]]
    for item, reference in zip(got["results"], expected["results"], strict=True):
        assert item["score"] == pytest.approx(reference["score"], abs=1e-6)


# --- every endpoint against the Python API ---


@pytest.mark.parametrize("text", TEXTS)
def test_text_search_equals_the_python_api(server, index, text):
    status, body, _ = fetch(server, f"/api/search?top_k=4&q={quote(text)}")
    assert status == 200
    assert_same_results(json.loads(body), results_document(text, index.search_text(text, 4)))


def test_image_search_equals_the_python_api(server, index, images):
    status, body, _ = fetch(server, "/api/search_image?top_k=3", (images / "d.jpg").read_bytes())
    assert status == 200
    expected = results_document("uploaded image", index.search_image(images / "d.jpg", 3))
    assert_same_results(json.loads(body), expected)
    assert json.loads(body)["results"][0]["filename"] == "d.jpg"


def test_embed_equals_the_shared_encoding_helpers(server, index, images):
    files = [images / "a.png", images / "c.png"]
    status, document = post_json(server, "/api/embed", {"texts": TEXTS, "images": list(map(encoded, files))})
    assert status == 200 and (document["dim"], document["backend"]) == (index.info.dim, "torch")
    model, processor = index.model, index.processor
    np.testing.assert_allclose(document["text_embeds"], encode_texts(model, processor, TEXTS), atol=1e-6)
    np.testing.assert_allclose(document["image_embeds"], encode_images(model, processor, files), atol=1e-6)


def test_embed_of_texts_only_gives_no_image_rows(server):
    status, document = post_json(server, "/api/embed", {"texts": ["猫"]})
    assert status == 200 and len(document["text_embeds"]) == 1 and document["image_embeds"] == []


SIMILARITY_CASES = {"image-text": (2, TEXTS), "text-text": (0, TEXTS), "image-image": (3, [])}


@pytest.mark.parametrize("mode", SIMILARITY_CASES)
def test_similarity_equals_predict_similarity(capsys, server, images, tiny_checkpoint, mode):
    image_count, texts = SIMILARITY_CASES[mode]
    files = [images / name for name in NAMES[:image_count]]
    request = {"texts": texts, "images": list(map(encoded, files)), "mode": mode, "top_k": 2}
    status, document = post_json(server, "/api/similarity", request)
    assert status == 200
    argv = ["--model_name_or_path", str(tiny_checkpoint), "--mode", mode, "--top_k", "2", "--json"]
    argv += ["--device", "cpu"] + (["--texts", *texts] if texts else [])
    argv += ["--images", *map(str, files)] if files else []
    predict_similarity.main(argv)
    expected = json.loads(capsys.readouterr().out)
    for key in ("mode", "probability", "top_k"):
        assert document[key] == expected[key]
    for key in ("cosine", "probs"):
        np.testing.assert_allclose(document[key], expected[key], atol=1e-5)
    names = [f"image {number}" for number in range(image_count)]
    assert document["queries"] == (texts if mode == "text-text" else names)


def test_healthz_says_what_is_served(server):
    status, body, _ = fetch(server, "/healthz")
    assert status == 200
    assert json.loads(body) == {
        "status": "ok", "images": len(NAMES), "generation": 1, "backend": "torch", "probability": "softmax"
    }  # fmt: skip


def test_the_openapi_schema_lists_every_endpoint_with_its_methods(server):
    status, body, _ = fetch(server, "/openapi.json")
    schema = json.loads(body)
    assert status == 200 and schema["openapi"].startswith("3.")
    assert {path: set(methods) for path, methods in schema["paths"].items()} == ENDPOINTS
    parameters = {item["name"]: item for item in schema["paths"]["/api/search"]["get"]["parameters"]}
    assert parameters["top_k"]["schema"]["maximum"] == MAX_TOP_K and parameters["q"]["required"]
    assert "image/*" in schema["paths"]["/api/search_image"]["post"]["requestBody"]["content"]


# --- bad input: 4xx with a JSON reason ---

BAD_REQUESTS = {
    "malformed body": ("/api/embed", b'{"texts": ["a"', 422, "the body is not valid JSON"),
    "body not an object": ("/api/embed", b'["a"]', 422, "Input should be a valid dictionary"),
    "unknown key": ("/api/embed", b'{"text": ["a"]}', 422, "text: Extra inputs are not permitted"),
    "nothing to embed": ("/api/embed", b'{"texts": []}', 422, "nothing to embed: give texts and/or images"),
    "empty text": ("/api/embed", b'{"texts": [""]}', 422, "texts.0: String should have at least 1 character"),
    "too many texts": (
        "/api/embed", json.dumps({"texts": ["猫"] * (MAX_TEXTS + 1)}).encode(), 422,
        f"texts: List should have at most {MAX_TEXTS} items",
    ),
    "too many images": (
        "/api/embed", json.dumps({"images": ["aGk="] * (MAX_IMAGES + 1)}).encode(), 422,
        f"images: List should have at most {MAX_IMAGES} items",
    ),
    "not base64": ("/api/embed", b'{"images": ["%%%"]}', 422, "images.0: not a base64 string"),
    "base64 of no image": ("/api/embed", b'{"images": ["aGVsbG8="]}', 400, "cannot read the uploaded image"),
    "mode without its inputs": (
        "/api/similarity", b'{"texts": ["a", "b"], "mode": "image-text"}', 400,
        "image-text mode needs images and texts",
    ),
    "one text to compare": ("/api/similarity", b'{"texts": ["a"]}', 400, "text-text mode needs at least 2"),
    "unknown mode": ("/api/similarity", b'{"texts": ["a", "b"], "mode": "x"}', 422, "mode: Input should be"),
    "top_k zero": ("/api/search?q=a&top_k=0", None, 422, "top_k: Input should be greater than or equal to 1"),
    "top_k too large": ("/api/search?q=a&top_k=101", None, 422, "top_k: Input should be less than or equal"),
    "top_k not a number": ("/api/search?q=a&top_k=ten", None, 422, "top_k: Input should be a valid integer"),
    "no query": ("/api/search", None, 422, "q: Field required"),
    "blank query": ("/api/search?q=%20%20", None, 400, "the query text is empty"),
    "upload not an image": ("/api/search_image", b"GIF89a not really", 400, "cannot read the uploaded image"),
    "empty upload": ("/api/search_image", b"", 400, "send one image file as the request body"),
    "path outside the index": ("/image?path=../index/index.json", None, 404, "not an indexed image"),
    "thumbnail outside the index": ("/thumbnail?path=/etc/passwd", None, 404, "not an indexed image"),
    "no such endpoint": ("/api/nothing", None, 404, "no such page: /api/nothing"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_with_a_json_reason(server, case):
    path, body, status, reason = BAD_REQUESTS[case]
    content_type = "application/json" if path.startswith(("/api/embed", "/api/similarity")) else None
    got_status, got_body, got_type = fetch(server, path, body, content_type)
    assert (got_status, got_type) == (status, "application/json")
    assert reason in json.loads(got_body)["error"]


def test_uploads_and_json_bodies_over_their_limits_get_413(index_dir, images):
    with serving(index_dir, limits=limits(max_upload_bytes=1000, max_json_bytes=2000)) as server:
        status, body, _ = fetch(server, "/api/search_image", b"x" * 1001)
        assert (status, json.loads(body)) == (413, {"error": "the request body is over 1000 bytes"})
        status, body, _ = fetch(server, "/api/embed", json.dumps({"texts": ["猫" * 500]}).encode())
        assert (status, json.loads(body)) == (413, {"error": "the request body is over 2000 bytes"})
        assert fetch(server, "/api/search_image?top_k=1", (images / "a.png").read_bytes())[0] == 200


# --- concurrency ---


def test_200_requests_from_16_threads_are_all_answered_correctly(server, index):
    queries = [f"{text}{number}" for number in range(5) for text in TEXTS]  # 15 distinct
    expected = {query: results_document(query, index.search_text(query, 3)) for query in queries}
    answers, lock = [], threading.Lock()

    def client(number: int) -> None:
        for request in range(number, 200, 16):
            query = queries[request % len(queries)]
            status, body, _ = fetch(server, f"/api/search?top_k=3&q={quote(query)}")
            with lock:
                answers.append((query, status, json.loads(body)))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 200 and {status for _, status, _ in answers} == {200}
    for query, _, document in answers:
        assert_same_results(document, expected[query])


def test_retrieval_py_serve_answers_on_the_address_it_prints(capsys, monkeypatch, index_dir):
    answers, serve_forever = [], SearchServer.run

    def run_briefly(server) -> None:  # instead of serving until Ctrl+C
        thread = threading.Thread(target=serve_forever, args=(server,), daemon=True)
        thread.start()
        try:
            while not server.server.started and thread.is_alive():
                time.sleep(0.01)
            url = re.search(r"at (http://\S+) with the torch backend", capsys.readouterr().out).group(1)
            with urllib.request.urlopen(url + "healthz", timeout=30) as response:
                answers.append(json.loads(response.read()))
        finally:
            server.stop()
            thread.join(10)

    monkeypatch.setattr(SearchServer, "run", run_briefly)
    retrieval.main(["serve", "--index", str(index_dir), "--port", "0", "--device", "cpu"])
    assert answers and answers[0]["images"] == len(NAMES)


def test_the_benchmarks_load_generator_gets_every_answer(server):
    from benchmarks.bench_service import run_load

    figures = run_load(server.port, "q", clients=4, requests=12, offset=0)
    assert (figures["requests"], figures["errors"]) == (12, 0)
    assert figures["queries_per_s"] > 0 and figures["latency_ms_p99"] >= figures["latency_ms_p50"] > 0


# --- scores follow the loss ---


@pytest.fixture(scope="module")
def siglip_index(tiny_checkpoint, index_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("siglip_service")
    checkpoint = write_siglip_checkpoint(tiny_checkpoint, root / "model", logit_scale=2.3, logit_bias=-4.0)
    source = images_in_directory(RetrievalIndex.load(index_dir).image_root)
    RetrievalIndex.build(checkpoint, root / "index", source, device="cpu")
    return root / "index"


def test_a_siglip_models_search_results_carry_sigmoid_match_probabilities(siglip_index, index):
    with serving(siglip_index) as server:
        status, body, _ = fetch(server, "/api/search?top_k=3&q=" + quote("一只猫"))
        assert json.loads(fetch(server, "/healthz")[1])["probability"] == "sigmoid"
        status, document = post_json(server, "/api/similarity", {"texts": TEXTS})
    assert status == 200 and document["probability"] == "sigmoid"
    for item in json.loads(body)["results"]:
        assert item["probability"] == pytest.approx(
            1 / (1 + math.exp(-(math.exp(2.3) * item["score"] - 4.0)))
        )
    cosine, probs = np.array(document["cosine"]), np.array(document["probs"])
    expected = 1 / (1 + np.exp(-(np.exp(2.3) * cosine - 4.0)))
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_a_clip_models_search_results_have_no_probability(server):
    status, body, _ = fetch(server, "/api/search?top_k=2&q=" + quote("一只猫"))
    assert status == 200 and all("probability" not in item for item in json.loads(body)["results"])
