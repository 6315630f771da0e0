"""The one path from raw texts and images to L2-normalised embeddings, plus scoring on top of it.

Training's evaluation, retrieval and `predict_similarity.py` all encode through `encode_texts`
and `encode_images`, which use the processor saved with the checkpoint (`ImageTransform` for
images), so an embedding never depends on which tool computed it.
"""

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from component.errors import InputError
from component.model import BertCLIPModel
from component.processor import ImageTransform, check_tokenizer_fits, load_processor, tokenize
from datatools.images import RejectedError

ImageInput = str | Path | Image.Image

# Prompts for zero-shot classification, a selection of the Chinese templates that Chinese-CLIP's
# ImageNet zero-shot evaluation averages over; "{}" is replaced by the class name (see `prompts`).
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "一张{}的照片。",
    "{}的照片。",
    "一张包含{}的照片。",
    "一张关于{}的照片。",
    "{}的特写照片。",
    "{}的明亮照片。",
    "{}的模糊照片。",
    "{}的低分辨率照片。",
    "一张{}的好照片。",
    "{}的黑白照片。",
    "一幅{}的画。",
    "{}的素描。",
)

_IMAGE_LOADING_THREADS = 8


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_processor(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[BertCLIPModel, object]:
    """A checkpoint's model (in eval mode, on `device`, default CUDA when available) and its processor.

    `path` is any directory (or hub name) `BertCLIPModel.from_pretrained` accepts: BertCLIP,
    transformers ChineseCLIP or the original CLIP-Chinese layout.
    """
    device = torch.device(device) if device is not None else default_device()
    try:
        model = BertCLIPModel.from_pretrained(path)
    except OSError as error:
        raise InputError(f"{path}: cannot load the model ({error})") from error
    processor = load_processor(path)  # a CheckpointError says what is missing or broken
    check_tokenizer_fits(processor.tokenizer, model, path)
    return model.to(device).eval(), processor


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@contextmanager
def _evaluating(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    # Eval mode (no dropout) and inference mode while encoding; the caller's mode is restored, so
    # that training can encode an evaluation set in the middle of an epoch.
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        model.train(was_training)


def _batches(count: int, batch_size: int, progress: bool, unit: str) -> Iterator[range]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc=f"Encoding {unit}s", unit="batch", disable=not progress):
        yield range(start, min(start + batch_size, count))


def _finish(chunks: list[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
    # Normalise in float32 (the chunks may be bf16), restore the input order, and clone outside
    # inference mode so that callers get ordinary tensors they may modify in place.
    embeds = F.normalize(torch.cat(chunks).float(), dim=-1)  # [n, dim]
    if order is not None:
        embeds = embeds[torch.argsort(torch.as_tensor(order))]
    return embeds.clone()


def encode_texts(
    model: BertCLIPModel,
    processor,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised text embeddings, [len(texts), projection_dim] float32 on the CPU.

    Args:
        max_length: tokens per text (including [CLS] and [SEP]); longer texts are truncated.
        device: where the inputs go; defaults to the model's device.
    """
    if not texts:
        raise InputError("no texts to encode")
    max_positions = model.config.text_config.max_position_embeddings
    if not 2 <= max_length <= max_positions:
        raise InputError(f"max_length must be between 2 and {max_positions} for this model, got {max_length}")
    device = torch.device(device) if device is not None else model_device(model)
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
    chunks = []
    with _evaluating(model, device):
        for batch in _batches(len(texts), batch_size, progress, "text"):
            inputs = tokenize(processor, [texts[order[index]] for index in batch], max_length)
            inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
            chunks.append(model.get_text_features(**inputs).cpu())
    return _finish(chunks, order)


def image_array(transform: ImageTransform, image: ImageInput) -> np.ndarray:
    """One image (a file, draft-decoded, or a PIL image) resized and cropped to uint8 [height, width, 3]."""
    if isinstance(image, Image.Image):
        return transform(image.convert("RGB"))
    path = Path(image)
    try:
        return transform(transform.load(path, draft=True))
    except RejectedError as error:
        if error.reason == "missing_file":
            raise InputError(f"{path}: no such image file") from None
        raise InputError(f"{path}: cannot read the image ({error})") from None


def encode_images(
    model: BertCLIPModel,
    processor,
    images: list[ImageInput],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised image embeddings, [len(images), projection_dim] float32 on the CPU.

    `images` are file paths or PIL images; files are decoded in a few threads, JPEGs in PIL's
    draft mode. An unreadable file raises `InputError` naming it. `device` defaults to the model's.
    """
    if not images:
        raise InputError("no images to encode")
    device = torch.device(device) if device is not None else model_device(model)
    transform = ImageTransform.from_processor(processor)
    chunks = []
    with ThreadPoolExecutor(_IMAGE_LOADING_THREADS) as pool, _evaluating(model, device):
        for batch in _batches(len(images), batch_size, progress, "image"):
            arrays = list(pool.map(lambda index: image_array(transform, images[index]), batch))
            pixel_values = transform.to_pixel_values(arrays, device)  # [batch, 3, height, width]
            chunks.append(model.get_image_features(pixel_values=pixel_values).cpu())
    return _finish(chunks)


def check_templates(templates: Sequence[str]) -> None:
    """Refuse an empty list of prompt templates, or a template without "{}" for the class name."""
    if not templates:
        raise InputError("no prompt templates for zero-shot classification")
    for template in templates:
        if "{}" not in template:
            raise InputError(f"prompt template {template!r} has no '{{}}' for the class name")


def prompts(label: str, templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[str]:
    """The zero-shot prompts for one class name, one per template.

    Each "{}" in a template becomes the class name; every other brace is literal text (unlike
    str.format, so that a template such as '{"label": "{}"}' works as written).
    """
    return [template.replace("{}", label) for template in templates]


def class_embeddings(
    model: BertCLIPModel,
    processor,
    labels: list[str],
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
    **encode_options,
) -> torch.Tensor:
    """Zero-shot classifier weights, [len(labels), projection_dim]: per class, the mean of its
    normalised prompt embeddings, normalised again (as in CLIP's and Chinese-CLIP's zero-shot
    evaluation). `encode_options` go to `encode_texts`.
    """
    if not labels:
        raise InputError("no labels for zero-shot classification")
    check_templates(templates)
    texts = [prompt for label in labels for prompt in prompts(label, templates)]
    prompt_embeds = encode_texts(model, processor, texts, **encode_options)
    prompt_embeds = prompt_embeds.view(len(labels), len(templates), -1)  # [labels, templates, dim]
    return F.normalize(prompt_embeds.mean(dim=1), dim=-1)


def logit_bias_of(model: torch.nn.Module) -> float | None:
    """The model's logit bias as a float (a SigLIP model), or None (a CLIP model, softmax scores)."""
    bias = getattr(model, "logit_bias", None)
    return None if bias is None else float(torch.as_tensor(bias).detach().float().cpu().item())


def probability_kind(logit_bias: float | torch.Tensor | None) -> Literal["softmax", "sigmoid"]:
    """How scores become probabilities: "sigmoid" for a model with a logit bias, else "softmax"."""
    return "softmax" if logit_bias is None else "sigmoid"


def match_probabilities(
    cosine: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Probabilities from cosine similarities [n_queries, n_candidates], as the model's loss reads them.

    A CLIP model (no `logit_bias`) was trained with a softmax over the candidates: each row is the
    softmax of cosine * exp(logit_scale) and sums to 1. A SigLIP model (with a bias) was trained to
    call each pair a match or not: each entry is sigmoid(cosine * exp(logit_scale) + logit_bias),
    independent of the other candidates. With `exclude_self` (queries and candidates are the same
    list) a query's match with itself gets probability 0.
    """
    logits = cosine.float() * torch.as_tensor(logit_scale, dtype=torch.float32).exp()
    if exclude_self and (cosine.shape[0] != cosine.shape[1] or cosine.shape[0] < 2):
        shape = tuple(cosine.shape)
        raise InputError(f"excluding self-matches needs 2 or more of the same inputs, got {shape}")
    if logit_bias is not None:
        probs = torch.sigmoid(logits + torch.as_tensor(logit_bias, dtype=torch.float32))
        return probs.masked_fill(torch.eye(len(cosine), dtype=torch.bool), 0.0) if exclude_self else probs
    if exclude_self:
        logits = logits.masked_fill(torch.eye(len(cosine), dtype=torch.bool), float("-inf"))
    return logits.softmax(dim=-1)


def similarity_scores(
    query_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    exclude_self: bool = False,
    logit_bias: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and match probabilities (`match_probabilities`), both [n_queries, n_candidates].

    With `exclude_self` a query's match with itself gets probability 0; its cosine stays in the matrix.
    """
    cosine = query_embeds.float() @ candidate_embeds.float().T  # [n_queries, n_candidates]
    return cosine, match_probabilities(cosine, logit_scale, logit_bias, exclude_self)


def top_candidates(cosine: torch.Tensor, top_k: int, exclude_self: bool = False) -> torch.Tensor:
    """Indices of each query's `top_k` most similar candidates, best first, [n_queries, k].

    With `exclude_self` a query is never its own candidate; k is capped at the number available.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    scores = cosine
    if exclude_self:
        scores = cosine.masked_fill(torch.eye(len(cosine), dtype=torch.bool), float("-inf"))
    available = cosine.shape[1] - (1 if exclude_self else 0)
    return scores.topk(min(top_k, available), dim=-1).indices


Mode = Literal["image-text", "text-text", "image-image"]
MODES: tuple[Mode, ...] = ("image-text", "text-text", "image-image")


@dataclass
class Scores:
    """Every query scored against every candidate, as predict_similarity.py and the service report it."""

    mode: Mode
    queries: list[str]
    candidates: list[str]
    cosine: torch.Tensor  # [n_queries, n_candidates]
    probs: torch.Tensor  # [n_queries, n_candidates]
    exclude_self: bool
    probability: Literal["softmax", "sigmoid"] = "softmax"
    templates: list[str] | None = None  # the prompt templates, for zero-shot labels


def score_embeddings(
    mode: Mode,
    queries: list[str],
    candidates: list[str],
    query_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    templates: list[str] | None = None,
) -> Scores:
    """Score encoded queries against encoded candidates; same-modality modes exclude self-matches."""
    exclude_self = mode != "image-text"
    cosine, probs = similarity_scores(query_embeds, candidate_embeds, logit_scale, exclude_self, logit_bias)
    kind = probability_kind(logit_bias)
    return Scores(mode, queries, candidates, cosine, probs, exclude_self, kind, templates)


def scores_document(scores: Scores, top_k: int) -> dict:
    """The JSON document: mode, how probabilities are computed ("softmax" or "sigmoid"), queries,
    candidates, the full cosine and probs matrices, and the indices of each query's `top_k` best
    candidates ("top_k"); "templates" for zero-shot labels."""
    document = {
        "mode": scores.mode,
        "probability": scores.probability,
        "queries": scores.queries,
        "candidates": scores.candidates,
        "cosine": scores.cosine.tolist(),
        "probs": scores.probs.tolist(),
        "top_k": top_candidates(scores.cosine, top_k, scores.exclude_self).tolist(),
    }
    if scores.templates is not None:
        document["templates"] = scores.templates
    return document
