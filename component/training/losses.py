"""The training side of the losses: the model prepared for its loss, a batch's loss, duplicate captions.

The losses themselves are pure functions in `component.loss`; this module decides what they are
given during training: the model's scales, and (with `dedupe_captions_in_batch`) which rows of the
global batch share a caption.
"""

import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from component.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, get_loss, world_size
from component.training.arg_values import ArgumentError

logger = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20  # rows


def prepare_model_for_loss(model, loss_name: str) -> None:
    """Give the model what the loss `loss_name` needs, before the optimizer is built.

    "siglip": a model without a logit bias gets one, with SigLIP's initial scale and bias (ln 10,
    -10, as open_clip starts SigLIP); a model continued from a SigLIP checkpoint keeps its own.
    "clip": a model with a bias is refused. A softmax ignores the bias, so it would stay frozen,
    while the model's scores would stay sigmoid probabilities that it no longer learns.
    """
    has_bias = getattr(model, "logit_bias", None) is not None
    if loss_name == "siglip" and not has_bias:
        model.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
        logger.info(f"sigmoid loss: new logit bias {SIGLIP_INIT_LOGIT_BIAS}, logit scale reset to ln 10")
    elif loss_name == "clip" and has_bias:
        raise ArgumentError(
            f"loss 'clip' cannot train {model.name_or_path or 'this model'}: it was trained with the sigmoid "
            'loss (it has a logit_bias); set "loss": "siglip" to continue it'
        )


def caption_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's tokens with padding as 0 and every real token as id + 1, [batch, length] int64.

    Equal rows are equal captions whatever the padding id is, and an id 0 (XLM-R's <s>) stays
    distinct from padding.
    """
    rows = input_ids.long() + 1
    return rows if attention_mask is None else rows * attention_mask.long()


def _gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's `rows`, padded to the longest rank's length with 0, and this rank's offset."""
    if world_size() == 1:
        return rows, 0
    length = torch.tensor([rows.shape[1]], device=rows.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)  # each rank padded its batch to its own longest
    rows = torch.nn.functional.pad(rows, (0, int(length) - rows.shape[1])).contiguous()
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    return torch.cat(gathered), dist.get_rank() * rows.shape[0]


@torch.no_grad()
def same_caption_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, global batch] bool: True where this rank's row i and global row j have the same caption.

    Under torchrun the token rows of every rank are gathered, so duplicates across ranks count too.
    """
    rows = caption_rows(input_ids, attention_mask)
    all_rows, offset = _gather_rows(rows)
    _, caption_id = torch.unique(all_rows, dim=0, return_inverse=True)  # [global batch]
    local = caption_id[offset : offset + rows.shape[0]]
    return local.unsqueeze(1) == caption_id.unsqueeze(0)


def batch_loss(model, inputs: dict, loss_name: str, dedupe_captions: bool = False):
    """The loss `loss_name` of one batch, and the model's outputs.

    dedupe_captions: rows with the same caption are not each other's negatives.
    """
    outputs = model(**inputs)
    same_caption = None
    if dedupe_captions:
        same_caption = same_caption_mask(inputs["input_ids"], inputs.get("attention_mask"))
    loss = get_loss(loss_name)(
        outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias,
        same_caption=same_caption,
    )  # fmt: skip
    return loss, outputs


def _caption_chunks(texts: Sequence[str]) -> Iterator[Iterator[bytes | memoryview]]:
    """The captions' UTF-8 bytes, a million rows at a time; straight from a `StringColumn`'s
    buffer, without decoding."""
    buffer, offsets = getattr(texts, "buffer", None), getattr(texts, "offsets", None)
    for start in range(0, len(texts), HASH_CHUNK):
        stop = min(start + HASH_CHUNK, len(texts))
        if buffer is None or offsets is None:
            yield (texts[row].encode("utf-8") for row in range(start, stop))
            continue
        view, ends = memoryview(buffer), offsets[start : stop + 1].tolist()
        yield (view[begin:end] for begin, end in itertools.pairwise(ends))


def caption_hashes(texts: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of every caption, one int64 array: about 0.6 s per million rows, and never a
    Python object per row for the whole column."""
    parts = [
        np.frombuffer(b"".join(hashlib.blake2b(text, digest_size=8).digest() for text in chunk), np.int64)
        for chunk in _caption_chunks(texts)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def count_duplicate_captions(texts: Sequence[str]) -> tuple[int, int]:
    """(rows whose caption another row also has, distinct captions that repeat)."""
    _, counts = np.unique(caption_hashes(texts), return_counts=True)
    repeated = counts[counts > 1]
    return int(repeated.sum()), len(repeated)


def warn_about_duplicate_captions(texts: Sequence[str], source: str, dedupe_captions: bool) -> int:
    """Log how many training rows share their caption with another row; returns that count.

    Identical captions in one batch are false negatives for each other (class names used as
    captions), which `dedupe_captions_in_batch` avoids.
    """
    rows, captions = count_duplicate_captions(texts)
    if rows == 0:
        return 0
    message = (
        f"{source}: {rows:,} of {len(texts):,} rows share their caption with another row "
        f"({captions:,} captions repeat)"
    )
    if dedupe_captions:
        logger.info(f"{message}; dedupe_captions_in_batch keeps them from being each other's negatives")
    else:
        logger.warning(
            f"{message}; rows with the same caption in one batch are treated as non-matching. "
            "Set dedupe_captions_in_batch: true in the arg file to stop that"
        )
    return rows


class _SourceCaptions:
    """The captions of a map-style `ImageTextSource`, as a sequence."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> str:
        return self.source.caption(index)


def dataset_captions(dataset) -> Sequence[str] | None:
    """A training dataset's captions: the CSV's packed text column, any other map-style source's
    captions, or None for a stream (its captions are only known once read)."""
    source = getattr(dataset, "source", None)
    texts = getattr(getattr(source, "rows", None), "texts", None)
    if texts is not None:
        return texts
    return _SourceCaptions(source) if hasattr(source, "caption") else None


def warn_about_duplicate_captions_in(dataset, name: str, dedupe_captions: bool) -> int:
    """`warn_about_duplicate_captions` over a training dataset's captions; 0 for a stream."""
    texts = dataset_captions(dataset)
    return 0 if texts is None else warn_about_duplicate_captions(texts, name, dedupe_captions)
