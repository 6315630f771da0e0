"""Retrieval evaluation of a model on a test set: the toolkit's recall and Chinese-CLIP's protocol."""

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from tqdm.auto import tqdm

from component.encoding import encode_images, encode_texts
from component.errors import InputError
from component.evaluation.cn_clip_protocol import cn_clip_retrieval_metrics
from component.evaluation.eval_data import EvalSet
from component.evaluation.metrics import group_by_caption, retrieval_metrics, trivial_recall_note
from component.processor import ImageTransform
from datatools.images import RejectedError

logger = logging.getLogger(__name__)

IMAGES_PER_CHUNK = 1024  # decoded images held in memory at once
DECODING_THREADS = 8


def decoded(image: Path | BinaryIO, key: str, source: str, transform: ImageTransform) -> Path | Image.Image:
    """A path as it is (`encode_images` reads it), a binary file object decoded to RGB as
    `encode_images` decodes a file (a large JPEG in draft mode), so that an image's embedding does
    not depend on whether it came from a file, a tsv, an LMDB or a shard."""
    if isinstance(image, Path):
        return image
    try:
        return transform.load(image, draft=True)
    except RejectedError as error:
        raise InputError(f"{source}: image {key} cannot be decoded ({error})") from None


def encode_image_keys(
    model, processor, eval_set: EvalSet, keys: Sequence[str], batch_size: int, progress: bool
) -> torch.Tensor:
    """Normalised embeddings of the images `keys`, [len(keys), dim], a chunk of images in memory at once.

    Images are read in this thread (an LMDB transaction must stay in its thread) and decoded in a few.
    """
    chunks = []
    transform = ImageTransform.from_processor(processor)
    starts = range(0, len(keys), IMAGES_PER_CHUNK)
    with ThreadPoolExecutor(DECODING_THREADS) as pool:
        for start in tqdm(
            starts, desc="Reading images", unit="chunk", disable=not progress or len(starts) < 2
        ):
            chunk = keys[start : start + IMAGES_PER_CHUNK]
            files = [eval_set.open_image(key) for key in chunk]
            sources = [eval_set.source] * len(chunk)
            inputs = list(pool.map(decoded, files, chunk, sources, [transform] * len(chunk)))
            chunks.append(
                encode_images(model, processor, inputs, batch_size, progress=len(starts) < 2 and progress)
            )
    return torch.cat(chunks)


def group_texts(eval_set: EvalSet) -> tuple[list[str], list[int]]:
    """The distinct texts (by text key, in first-seen order) and, per pair, its text's row."""
    row_of: dict[str, int] = {}
    texts, pair_rows = [], []
    for text, key in zip(eval_set.pair_texts, eval_set.pair_text_keys, strict=True):
        if key not in row_of:
            row_of[key] = len(texts)
            texts.append(text)
        pair_rows.append(row_of[key])
    return texts, pair_rows


def retrieval_scores(
    text_embeds: torch.Tensor, pair_rows: list[int], image_embeds: torch.Tensor, eval_set: EvalSet
) -> dict[str, dict[str, float]]:
    """Both sets of metrics from the embeddings of the distinct texts and of every candidate image.

    "toolkit": `retrieval_metrics` as training's evaluation reports it (each distinct caption and
    each image once, only images with a text; fractions). "cn_clip": Chinese-CLIP's protocol (each
    text once against every candidate image; percentages, MR the mean of the six recalls).
    """
    image_column = {key: column for column, key in enumerate(eval_set.images)}
    pair_columns = [image_column[key] for key in eval_set.pair_images]
    _, text_to_images = group_by_caption(eval_set.pair_text_keys, pair_columns)  # as group_texts orders them
    cn_clip = cn_clip_retrieval_metrics(text_embeds @ image_embeds.T, text_to_images)

    used_columns = list(dict.fromkeys(pair_columns))  # images with a text, in first-pair order
    image_number = {column: number for number, column in enumerate(used_columns)}
    # As training groups them: one text per distinct caption.
    pairs, text_to_used = group_by_caption(eval_set.pair_texts, [image_number[c] for c in pair_columns])
    caption_rows = [pair_rows[pair] for pair in pairs]
    toolkit = retrieval_metrics(image_embeds[used_columns], text_embeds[caption_rows], text_to_used)
    note = trivial_recall_note(len(used_columns), len(caption_rows))
    if note:
        logger.warning(f"{eval_set.source}: {note}")
    return {"toolkit": toolkit, "cn_clip": cn_clip}


def evaluate_retrieval(
    model, processor, eval_set: EvalSet, batch_size: int = 64, max_length: int = 64, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Encode the test set's texts and images with the model and score retrieval both ways (see
    `retrieval_scores`); the counts go in "data"."""
    texts, pair_rows = group_texts(eval_set)
    text_embeds = encode_texts(model, processor, texts, batch_size, max_length, progress=progress)
    image_embeds = encode_image_keys(model, processor, eval_set, eval_set.images, batch_size, progress)
    scores = retrieval_scores(text_embeds, pair_rows, image_embeds, eval_set)
    scores["data"] = {"pairs": len(eval_set), "texts": len(texts), "images": len(eval_set.images)}
    return scores
