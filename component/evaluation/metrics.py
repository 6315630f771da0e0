"""Retrieval metrics over a whole test set, where several captions may share one image and one
caption (a class name, say) may belong to several images."""

from collections.abc import Sequence

import torch

RECALL_AT = (1, 5, 10)


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[Sequence[int]],
) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 and their mean, as fractions.

    Args:
        image_embeds: normalised embeddings of the distinct images, [n_images, dim].
        text_embeds: normalised embeddings of the distinct captions, [n_texts, dim].
        text_to_image: for each caption, the row of its image in `image_embeds` ([n_texts]), or
            the rows of all its images (one list per caption).

    An image counts as retrieved at k when any of its captions is among its k nearest texts, and a
    caption when any of its images is among its k nearest images. A caption shared by several
    images is one text matched by each of them, as Chinese-CLIP's evaluation counts it: as rows of
    their own, copies of a caption would tie, and the tie-break would decide the recall.
    """
    similarity = image_embeds.float() @ text_embeds.float().T  # [n_images, n_texts]
    n_images, n_texts = similarity.shape
    matches = torch.zeros(n_images, n_texts, dtype=torch.bool)
    if isinstance(text_to_image, torch.Tensor):
        matches[text_to_image, torch.arange(n_texts)] = True
    else:
        for text, images in enumerate(text_to_image):
            matches[list(images), text] = True

    # Rank of the first matching candidate from each side; 0 is best.
    image_order = similarity.argsort(dim=1, descending=True)  # [n_images, n_texts]
    best_caption_rank = matches.gather(1, image_order).float().argmax(dim=1)
    text_order = similarity.T.argsort(dim=1, descending=True)  # [n_texts, n_images]
    best_image_rank = matches.T.gather(1, text_order).float().argmax(dim=1)

    metrics = {}
    for k in RECALL_AT:
        metrics[f"i2t_recall@{k}"] = (best_caption_rank < k).float().mean().item()
        metrics[f"t2i_recall@{k}"] = (best_image_rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def group_by_caption(captions: Sequence[str], images: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Rows of (caption, image number) grouped as `retrieval_metrics` wants its texts: the first row
    of each distinct caption (or text key), in first-seen order, and for each the sorted numbers of
    its images."""
    first_row: dict[str, int] = {}
    caption_images: dict[str, set[int]] = {}
    for row, (caption, image) in enumerate(zip(captions, images, strict=True)):
        first_row.setdefault(caption, row)
        caption_images.setdefault(caption, set()).add(image)
    return list(first_row.values()), [sorted(numbers) for numbers in caption_images.values()]


def trivial_recall_note(n_images: int, n_texts: int) -> str | None:
    """Which recalls are 1.0 whatever the model, because a query has at most k candidates; None if none.

    Text->image recall@k is trivial with k or fewer images, image->text recall@k with k or fewer
    captions; with a single image every recall is 1.0 and the score means nothing.
    """
    trivial = [f"t2i_recall@{k}" for k in RECALL_AT if n_images <= k]
    trivial += [f"i2t_recall@{k}" for k in RECALL_AT if n_texts <= k]
    if not trivial:
        return None
    if n_images <= 1:
        return (f"only {n_images} image and {n_texts} caption(s) to score: every recall is 1.0 whatever "
                "the model, so the metric means nothing here; add test rows")  # fmt: skip
    verb = "is" if len(trivial) == 1 else "are"
    return (f"{n_images} images and {n_texts} captions to score: {', '.join(trivial)} {verb} 1.0 whatever "
            "the model (a query has at most k candidates); add test rows for a meaningful score")  # fmt: skip
