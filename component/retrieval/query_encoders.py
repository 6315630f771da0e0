"""What turns a query into an embedding for the search service: the PyTorch model or ONNX Runtime.

Both give L2-normalised float32 embeddings [n, dim] as numpy arrays, and the model's logit scale
(and bias, for a SigLIP model) for probabilities. `TorchQueryEncoder` is the shared encoding
helper (component.encoding). `OnnxQueryEncoder` runs the graphs that export_onnx.py writes, with
the processor saved beside them and numpy preprocessing: no PyTorch model in the query path. The
two agree to 1e-4 (tests/test_service_onnx.py).
"""

import json
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from component.encoding import encode_images, encode_texts, logit_bias_of
from component.errors import InputError
from component.formats.onnx_export import METADATA_FILE
from component.formats.onnx_parity import onnx_session
from component.processor import ImageTransform, load_processor, tokenize
from component.retrieval.index import RetrievalIndex

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx")
TEXT_MAX_LENGTH = 64  # tokens per query text, as `RetrievalIndex.search_text` uses
ONNX_BATCH_SIZE = 64


class QueryEncoder(Protocol):
    """Texts and decoded images to L2-normalised float32 embeddings [n, dim]."""

    backend: Backend
    logit_scale: float
    logit_bias: float | None

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


class TorchQueryEncoder:
    """The index's PyTorch model through the shared encoding helpers."""

    backend: Backend = "torch"

    def __init__(self, model, processor, max_length: int = TEXT_MAX_LENGTH):
        self.model, self.processor, self.max_length = model, processor, max_length
        self.logit_scale = float(model.logit_scale.detach().float().cpu().item())
        self.logit_bias = logit_bias_of(model)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings [len(texts), dim]."""
        return encode_texts(self.model, self.processor, texts, max_length=self.max_length).numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Image embeddings [len(images), dim]."""
        return encode_images(self.model, self.processor, images).numpy()


def normalise_rows(embeds: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float32, as `component.encoding` normalises."""
    embeds = np.asarray(embeds, dtype=np.float32)
    return embeds / np.maximum(np.linalg.norm(embeds, axis=-1, keepdims=True), 1e-12)


class OnnxQueryEncoder:
    """The text and image graphs of an export_onnx.py directory, run by ONNX Runtime on the CPU."""

    backend: Backend = "onnx"

    def __init__(self, directory: str | Path, max_length: int = TEXT_MAX_LENGTH):
        directory = Path(directory)
        self.metadata = read_onnx_metadata(directory)
        try:
            import onnxruntime  # noqa: F401 (onnx_session imports it; fail here with the install line)
        except ImportError:
            raise InputError("--backend onnx needs onnxruntime: pip install '.[onnx]'") from None
        # Its threads do not spin between queries, which would take the cores the HTTP server needs.
        self.text_session, self.image_session = (
            onnx_session(directory / self.metadata[kind]["file"])
            for kind in ("text_encoder", "image_encoder")
        )
        self.processor = load_processor(directory)
        self.transform = ImageTransform.from_processor(self.processor)
        self.max_length = min(max_length, int(self.metadata["max_seq_length"]))
        self.logit_scale = float(self.metadata["logit_scale"])
        bias = self.metadata.get("logit_bias")
        self.logit_bias = None if bias is None else float(bias)
        self.text_inputs = [item.name for item in self.text_session.get_inputs()]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings [len(texts), dim], tokenised by `component.processor.tokenize`."""
        if not texts:
            raise InputError("no texts to encode")
        chunks = []
        for start in range(0, len(texts), ONNX_BATCH_SIZE):
            tokens = tokenize(self.processor, texts[start : start + ONNX_BATCH_SIZE], self.max_length)
            feeds = {name: tokens[name].numpy().astype(np.int64) for name in self.text_inputs}
            chunks.append(self.text_session.run(["text_embeds"], feeds)[0])
        return normalise_rows(np.concatenate(chunks))

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        """Normalised pixel values [batch, 3, height, width], float32, as `ImageTransform` gives them."""
        batch = np.stack([self.transform(image.convert("RGB")) for image in images])  # [b, h, w, 3]
        pixels = batch.transpose(0, 3, 1, 2).astype(np.float32)
        mean = np.asarray(self.transform.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.transform.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((pixels / 255.0 - mean) / std, dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Image embeddings [len(images), dim]."""
        if not images:
            raise InputError("no images to encode")
        chunks = []
        for start in range(0, len(images), ONNX_BATCH_SIZE):
            pixels = self.pixel_values(images[start : start + ONNX_BATCH_SIZE])
            chunks.append(self.image_session.run(["image_embeds"], {"pixel_values": pixels})[0])
        return normalise_rows(np.concatenate(chunks))


def read_onnx_metadata(directory: Path) -> dict:
    """onnx_export.json of an export_onnx.py output directory; InputError when it is not one."""
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
        for key in ("logit_scale", "max_seq_length", "projection_dim", "text_encoder", "image_encoder"):
            metadata[key]  # a KeyError names the missing key
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{directory}: not an export_onnx.py output directory ({path.name}: {error}); "
            "export the index's model with `python export_onnx.py --model_name_or_path DIR --output D`"
        ) from error
    return metadata


def check_onnx_fits_index(encoder: OnnxQueryEncoder, index: RetrievalIndex, directory: Path) -> None:
    """Refuse an export of another model than the index's, as far as the export records it."""
    fingerprint = encoder.metadata.get("model_fingerprint")
    if fingerprint is not None and fingerprint != index.info.model_fingerprint:
        raise InputError(
            f"{directory} is an export of another model than the one that built {index.directory} "
            f"(fingerprint {index.info.model_fingerprint[:12]})"
        )
    if int(encoder.metadata["projection_dim"]) != index.info.dim:
        raise InputError(
            f"{directory} gives {encoder.metadata['projection_dim']}-dimensional embeddings, "
            f"but {index.directory} holds {index.info.dim}; export the index's model"
        )


def load_query_encoder(index: RetrievalIndex, backend: Backend, onnx_dir: str | Path | None) -> QueryEncoder:
    """The encoder for `backend`: the index's PyTorch model (loaded and checked), or its ONNX export."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        if onnx_dir is not None:
            raise InputError("--onnx_dir goes with --backend onnx")
        return TorchQueryEncoder(*index.load_model())
    if onnx_dir is None:
        raise InputError("--backend onnx needs --onnx_dir, a directory written by export_onnx.py")
    encoder = OnnxQueryEncoder(onnx_dir)
    check_onnx_fits_index(encoder, index, Path(onnx_dir))
    return encoder
