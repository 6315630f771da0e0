"""The faiss index over an index's embeddings: exact (flat) or approximate (IVF), built or grown."""

import math
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from component.errors import InputError
from component.retrieval.store import ROWS_PER_CHUNK, IndexInfo, read_vectors, write_vectors

IndexType = Literal["exact", "approximate", "auto"]
INDEX_TYPES: tuple[IndexType, ...] = ("exact", "approximate", "auto")
EXACT_INDEX_LIMIT = 2_000_000  # "auto" builds an exact index up to this many vectors, an IVF one above
IVF_PROBED_LISTS = 64  # IVF lists searched per query; see docs/retrieval.md for the recall it gives
IVF_TRAINING_POINTS_PER_LIST = 32


def choose_index_type(requested: IndexType, count: int) -> Literal["exact", "approximate"]:
    """The index type asked for, or for "auto" exact up to `EXACT_INDEX_LIMIT` vectors."""
    if requested not in INDEX_TYPES:
        raise InputError(f"index_type must be one of {INDEX_TYPES}, got {requested!r}")
    if requested == "auto":
        return "exact" if count <= EXACT_INDEX_LIMIT else "approximate"
    return requested


def ivf_list_count(count: int) -> int:
    """IVF lists for `count` vectors: about 4 sqrt(n), with at least 39 training vectors per list."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def new_vector_index(index_type: str, embeddings: np.ndarray) -> faiss.Index:
    """An empty inner-product index: flat (exact), or IVF trained on a sample of `embeddings`."""
    dim = embeddings.shape[1]
    if index_type == "exact":
        return faiss.IndexFlatIP(dim)
    lists = ivf_list_count(len(embeddings))
    index = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    clustering = faiss.extract_index_ivf(index).cp
    # k-means over a few million vectors: 10 rounds (faiss's default is 25) take minutes on 2 cores.
    clustering.niter = 10
    clustering.min_points_per_centroid = 1  # a small index has 1 list; no warning about too few points
    sample_size = min(len(embeddings), IVF_TRAINING_POINTS_PER_LIST * lists)
    sample = np.unique(np.linspace(0, len(embeddings) - 1, sample_size).astype(np.int64))
    index.train(np.asarray(embeddings[sample], dtype=np.float32))
    return index


def add_vectors(index: faiss.Index, embeddings: np.ndarray, start: int = 0) -> None:
    """Add rows `start:` of `embeddings` (float16 or float32, possibly memory-mapped) to `index`."""
    for row in range(start, len(embeddings), ROWS_PER_CHUNK):
        index.add(np.ascontiguousarray(embeddings[row : row + ROWS_PER_CHUNK], dtype=np.float32))


def update_vectors(
    output: Path, info: IndexInfo, previous: IndexInfo | None, embeddings: np.ndarray, kept_all: bool
) -> faiss.Index:
    """Add the new rows to the previous faiss index where it still fits, else build a new one."""
    reusable = previous is not None and kept_all and previous.index_type == info.index_type
    if reusable and info.index_type == "approximate":
        reusable = ivf_list_count(len(embeddings)) <= 2 * previous.ivf_lists  # retrain after ~4x growth
    vectors = read_vectors(output, previous, memory_map=False) if reusable else None
    if vectors is None:
        vectors = new_vector_index(info.index_type, embeddings)
    add_vectors(vectors, embeddings, start=vectors.ntotal)
    if info.index_type == "approximate":
        info.ivf_lists = faiss.extract_index_ivf(vectors).nlist
        info.ivf_probed_lists = min(IVF_PROBED_LISTS, info.ivf_lists)
    else:
        info.ivf_lists = info.ivf_probed_lists = 0
    write_vectors(output, info, vectors)
    return vectors
