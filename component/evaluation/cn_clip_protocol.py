"""Chinese-CLIP's retrieval protocol: the numbers its eval scripts report, from one similarity matrix.

Chinese-CLIP ranks every image for each text (`make_topk_predictions.py`: scores sorted from high
to low, ties in image order) and counts a text as found at k when any of its images is among the
first k (`evaluation.py`); image-to-text does the same over the images that have a text
(`transform_ir_annotation_to_tr.py`, `evaluation_tr.py`). Scores are percentages, and "mean
recall" is the mean of R@1, R@5 and R@10; MR, as in its result tables, is the mean of all six.
"""

from collections.abc import Sequence

import torch

CN_CLIP_RECALL_AT = (1, 5, 10)
_QUERY_CHUNK = 1024  # rows of the similarity matrix compared at once; bounds the memory


def first_hit_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """The 0-based rank of each row's best relevant candidate, ties broken by candidate order.

    This is the position a stable descending sort (Python's `sorted(..., reverse=True)`, as
    Chinese-CLIP's scripts use) gives the first relevant candidate, without sorting: the number
    of candidates that score higher, plus those that score the same and come earlier.

    Args:
        scores: [queries, candidates].
        relevant: bool [queries, candidates]; every row has at least one True.
    """
    masked = scores.masked_fill(~relevant, float("-inf"))
    best_score, best_index = masked.max(dim=1, keepdim=True)  # max returns the first of equal maxima
    positions = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > best_score) | ((scores == best_score) & (positions < best_index))
    return ahead.sum(dim=1)


def _recalls(scores: torch.Tensor, relevant: torch.Tensor, prefix: str) -> dict[str, float]:
    ranks = torch.cat(
        [
            first_hit_ranks(scores[start : start + _QUERY_CHUNK], relevant[start : start + _QUERY_CHUNK])
            for start in range(0, scores.shape[0], _QUERY_CHUNK)
        ]
    )
    recalls = {f"{prefix}_r{k}": 100.0 * (ranks < k).double().mean().item() for k in CN_CLIP_RECALL_AT}
    recalls[f"{prefix}_mean_recall"] = sum(recalls.values()) / len(recalls)
    return recalls


def cn_clip_retrieval_metrics(
    similarity: torch.Tensor, text_to_images: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Text-to-image and image-to-text R@1/5/10 (in percent), each direction's mean, and MR.

    Args:
        similarity: text-image scores, [n_texts, n_images] (the dot products of the features).
        text_to_images: for each text, the columns of its images (a text may have several).

    Keys: t2i_r1, t2i_r5, t2i_r10, t2i_mean_recall (what evaluation.py reports), the same with
    i2t (evaluation_tr.py; only images with at least one text are queries), and mean_recall (MR).
    """
    n_texts, n_images = similarity.shape
    if len(text_to_images) != n_texts:
        raise ValueError(f"{len(text_to_images)} ground-truth rows for {n_texts} texts")
    relevant = torch.zeros(n_texts, n_images, dtype=torch.bool)
    for text, images in enumerate(text_to_images):
        if not images:
            raise ValueError(f"text {text} has no image")
        relevant[text, list(images)] = True
    similarity = similarity.float().cpu()
    metrics = _recalls(similarity, relevant, "t2i")
    queried = relevant.any(dim=0)  # images without a text are candidates only
    metrics |= _recalls(similarity.T[queried], relevant.T[queried], "i2t")
    metrics["mean_recall"] = sum(metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in CN_CLIP_RECALL_AT) / 6
    return metrics
