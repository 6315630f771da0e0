"""`retrieval.py serve --backend onnx`: queries encoded by ONNX Runtime from an export_onnx.py
directory give the PyTorch backend's embeddings and rankings to 1e-4."""

import base64
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")
from _service import fetch, serving
from test_retrieval import draw_images

import retrieval
from component.encoding import load_model_and_processor
from component.errors import InputError
from component.formats.onnx_export import export_onnx
from component.retrieval.images import images_in_directory
from component.retrieval.index import RetrievalIndex
from component.retrieval.query_encoders import OnnxQueryEncoder, TorchQueryEncoder, load_query_encoder

NAMES = ["a.png", "b.jpg", "c.png", "d.jpg"]
# Short and long texts, so that one batch pads some of them.
TEXTS = ["猫", "一只猫", "红色的汽车停在路边，旁边有一棵很高的树和一个蓝色的邮筒", "蓝天白云"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """An index of drawn images and an ONNX export of the model that built it (parity checked lightly)."""
    root = tmp_path_factory.mktemp("onnx_service")
    draw_images(root / "images", NAMES)
    RetrievalIndex.build(tiny_checkpoint, root / "index", images_in_directory(root / "images"), device="cpu")
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    with redirect_stdout(io.StringIO()):
        export_onnx(model, processor, root / "onnx", text_cases=[(1, 4)], image_batch_sizes=(1,))
    return root / "index", root / "onnx"


@pytest.fixture(scope="module")
def encoders(setup) -> tuple[TorchQueryEncoder, OnnxQueryEncoder]:
    index_dir, onnx_dir = setup
    index = RetrievalIndex.load(index_dir, device="cpu")
    return load_query_encoder(index, "torch", None), load_query_encoder(index, "onnx", onnx_dir)


def test_onnx_text_embeddings_equal_pytorchs(encoders):
    torch_encoder, onnx_encoder = encoders
    got, expected = onnx_encoder.encode_texts(TEXTS), torch_encoder.encode_texts(TEXTS)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= TOLERANCE
    assert (onnx_encoder.logit_scale, onnx_encoder.logit_bias) == (torch_encoder.logit_scale, None)


def test_onnx_image_embeddings_equal_pytorchs(encoders, setup):
    torch_encoder, onnx_encoder = encoders
    root = RetrievalIndex.load(setup[0]).image_root
    images = [Image.open(root / name).convert("RGB") for name in NAMES]
    images.append(Image.new("RGB", (90, 50), "teal"))  # resized and cropped
    got, expected = onnx_encoder.encode_images(images), torch_encoder.encode_images(images)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_the_onnx_backend_answers_as_the_pytorch_backend(setup):
    index_dir, onnx_dir = setup
    image = (RetrievalIndex.load(index_dir).image_root / "b.jpg").read_bytes()
    embed_request = json.dumps({"texts": TEXTS, "images": [base64.b64encode(image).decode()]}).encode()
    answers = {}
    for backend in ("torch", "onnx"):
        with serving(index_dir, backend, onnx_dir if backend == "onnx" else None) as server:
            text = json.loads(fetch(server, "/api/search?top_k=4&q=" + quote(TEXTS[1]))[1])
            upload = json.loads(fetch(server, "/api/search_image?top_k=4", image)[1])
            embeds = json.loads(fetch(server, "/api/embed", embed_request, "application/json")[1])
            health = json.loads(fetch(server, "/healthz")[1])
        answers[backend] = text, upload, embeds, health
    for torch_answer, onnx_answer in zip(answers["torch"][:2], answers["onnx"][:2], strict=True):
        assert [item["filename"] for item in onnx_answer["results"]] == [
            item["filename"] for item in torch_answer["results"]
        ]
        scores = [[item["score"] for item in answer["results"]] for answer in (torch_answer, onnx_answer)]
        assert np.abs(np.subtract(*scores)).max() <= TOLERANCE
    for key in ("text_embeds", "image_embeds"):
        assert np.abs(np.subtract(answers["onnx"][2][key], answers["torch"][2][key])).max() <= TOLERANCE
    assert (answers["torch"][3]["backend"], answers["onnx"][3]["backend"]) == ("torch", "onnx")


def test_an_export_of_another_size_is_refused(setup, tmp_path):
    index_dir, onnx_dir = setup
    (tmp_path / "onnx").mkdir()
    for path in onnx_dir.iterdir():
        (tmp_path / "onnx" / path.name).symlink_to(path)
    metadata = json.loads((onnx_dir / "onnx_export.json").read_text())
    (tmp_path / "onnx" / "onnx_export.json").unlink()
    (tmp_path / "onnx" / "onnx_export.json").write_text(json.dumps({**metadata, "projection_dim": 7}))
    with pytest.raises(InputError, match="gives 7-dimensional embeddings"):
        load_query_encoder(RetrievalIndex.load(index_dir), "onnx", tmp_path / "onnx")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--backend", "onnx"], "--backend onnx needs --onnx_dir"),
        (["--backend", "onnx", "--onnx_dir", "{index}"], "not an export_onnx.py output directory"),
        (["--onnx_dir", "{index}"], "--onnx_dir goes with --backend onnx"),
    ],
)
def test_serve_refuses_a_backend_without_its_export_in_one_line(capsys, setup, options, message):
    index_dir = setup[0]
    argv = ["serve", "--index", str(index_dir), "--port", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        retrieval.main(argv + [option.format(index=index_dir) for option in options])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "Traceback" not in error
