"""Text-to-image and image-to-image search over an image collection, with a faiss index on disk.

Building or updating an index directory, and searching it. Beside this module: the images to
index and their encoding (images.py), the faiss index (vectors.py), the files of an index
directory (store.py), and the search service: its FastAPI application (service.py) served by
uvicorn (server.py).
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from component.encoding import ImageInput, encode_images, encode_texts, load_model_and_processor
from component.errors import InputError
from component.processor import ImageTransform
from component.retrieval.images import ImageSource, encode_image_files
from component.retrieval.store import (
    EmbeddingDtype,
    IndexInfo,
    InfoStamp,
    check_output_directory,
    data_file_name,
    index_lock,
    read_data_files,
    read_index_files,
    read_info,
    read_info_stamp,
    read_vectors,
    remove_stale_files,
    write_embeddings,
    write_info,
    write_metadata,
)
from component.retrieval.vectors import IndexType, choose_index_type, update_vectors


def model_fingerprint(model: torch.nn.Module, processor) -> str:
    """A hash of what decides the embeddings: the text pooling, the image transform, the vocabulary,
    and every weight tensor's name, shape and 1,024 evenly spaced values."""
    digest = hashlib.sha256()
    settings = {
        "text_pooling": model.config.text_pooling,
        "image_transform": asdict(ImageTransform.from_processor(processor)),
        "vocabulary": sorted(processor.tokenizer.get_vocab().items()),
    }
    digest.update(json.dumps(settings, ensure_ascii=False).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().reshape(-1)
        sample = values[:: max(1, values.numel() // 1024)][:1024].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample.tobytes())
    return digest.hexdigest()


# --- building and updating an index directory ---


def check_same_collection(
    previous: IndexInfo, output: Path, fingerprint: str, root: Path, dtype: EmbeddingDtype | None
) -> None:
    """Refuse to add to an index built by another model, from another folder, or at another precision."""
    if previous.model_fingerprint != fingerprint:
        raise InputError(
            f"{output} was built with the model {previous.model_name_or_path} (fingerprint "
            f"{previous.model_fingerprint[:12]}), and this model differs (fingerprint {fingerprint[:12]}); "
            "embeddings of two models cannot be searched together: use a new --output directory"
        )
    if Path(previous.image_root) != root:
        raise InputError(
            f"{output} indexes the images under {previous.image_root}, not {root}; "
            "use a new --output directory for another collection"
        )
    if dtype is not None and dtype != previous.dtype:
        raise InputError(f"{output} stores {previous.dtype} embeddings; --dtype {dtype} needs a new index")


def recorded_model_path(model_name_or_path: str | Path) -> str:
    """An existing local path made absolute (so that search works from any directory), else the name."""
    path = Path(model_name_or_path)
    return str(path.absolute()) if path.exists() else str(model_name_or_path)


def write_data_files(
    output: Path,
    info: IndexInfo,
    previous: IndexInfo | None,
    old_embeddings: np.ndarray | None,
    keep_rows: np.ndarray,
    new_raw: Path,
    metadata: pd.DataFrame,
) -> tuple[np.ndarray, faiss.Index]:
    """Write this generation's files (embeddings and vectors only where they change); fill `info.files`."""
    new_count = len(metadata) - len(keep_rows)
    kept_all = previous is not None and len(keep_rows) == previous.count
    if previous is None or new_count or not kept_all:
        info.files["embeddings"] = data_file_name("embeddings", info.generation)
        if old_embeddings is None:  # a new index: the dtype comes from `info`
            old_embeddings = np.empty((0, info.dim), dtype=info.dtype)
        embeddings = write_embeddings(info.path(output, "embeddings"), old_embeddings, keep_rows, new_raw)
    else:
        embeddings = old_embeddings
    if previous is None or new_count or not kept_all or previous.index_type != info.index_type:
        vectors = update_vectors(output, info, previous, embeddings, kept_all)
    else:
        vectors = read_vectors(output, previous)
        info.ivf_lists, info.ivf_probed_lists = previous.ivf_lists, previous.ivf_probed_lists
    write_metadata(output, info, metadata)
    return embeddings, vectors


def build_metadata(filenames: list[str], source: ImageSource) -> pd.DataFrame:
    """The metadata table: filename, plus the source's text for each when it has texts."""
    table = pd.DataFrame({"filename": filenames}, dtype=str)
    if source.texts is not None:
        texts = dict(zip(source.filenames, source.texts, strict=True))
        table["text"] = [texts[name] for name in filenames]
    return table


def build_index(
    model_name_or_path: str | Path,
    output: str | Path,
    source: ImageSource | Callable[[], ImageSource],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    index_type: IndexType = "auto",
    dtype: EmbeddingDtype | None = None,
    progress: bool = False,
) -> "RetrievalIndex":
    """Encode the images of `source` not yet in the index in `output` and write the index, holding
    its lock (`RetrievalIndex.build` is this function).

    Images no longer in `source` are dropped; unreadable ones are skipped and listed in
    `info.last_run["unreadable"]`. An index built by another model (or from another image root)
    is refused.

    Args:
        source: the images, or a function that makes them (called holding the lock, after the
            model loads: it may write into `output`, as `images_in_data` does).
        index_type: "exact" (flat inner product), "approximate" (IVF), or "auto": exact up to
            `EXACT_INDEX_LIMIT` vectors.
        dtype: how embeddings are stored; default float16, or the existing index's.
    """
    output = Path(output)
    check_output_directory(output)  # before a lock file goes into it
    with index_lock(output):
        previous = read_info(output)
        model, processor = load_model_and_processor(model_name_or_path, device)
        if callable(source):
            source = source()
        info = IndexInfo(
            model_name_or_path=recorded_model_path(model_name_or_path),
            model_fingerprint=model_fingerprint(model, processor),
            image_root=str(source.root),
            dim=model.config.projection_dim,
            dtype=dtype or (previous.dtype if previous else "float16"),
            index_type="exact",  # chosen by `write_generation` once the count is known
            generation=previous.generation + 1 if previous else 1,
            files=dict(previous.files) if previous else {},
            has_text=source.texts is not None,
        )
        if previous is not None:
            check_same_collection(previous, output, info.model_fingerprint, source.root, dtype)
        encode = partial(
            encode_image_files,
            model,
            processor,
            source,
            dtype=info.dtype,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        metadata, embeddings, vectors = write_generation(output, info, previous, source, encode, index_type)
        remove_stale_files(output, info)
        stamp = read_info_stamp(output)
    return RetrievalIndex(output, info, metadata, embeddings, vectors, model, processor, info_stamp=stamp)


def write_generation(
    output: Path,
    info: IndexInfo,
    previous: IndexInfo | None,
    source: ImageSource,
    encode: Callable[[list[str], Path], tuple[list[str], list[dict[str, str]]]],
    index_type: IndexType,
) -> tuple[pd.DataFrame, np.ndarray, faiss.Index]:
    """Encode the images of `source` not in `previous`, write the generation `info` describes and
    then its index.json. `encode(filenames, raw_file)` is `encode_image_files` with its options."""
    old_embeddings, old_metadata = None, pd.DataFrame({"filename": []}, dtype=str)
    if previous is not None:
        old_embeddings, old_metadata = read_data_files(output, previous)
    keep_rows = np.flatnonzero(old_metadata["filename"].isin(set(source.filenames)).to_numpy())
    known = set(old_metadata["filename"])
    new_raw = output / f".new-embeddings.{os.getpid()}.tmp"
    try:
        encoded, unreadable = encode([name for name in source.filenames if name not in known], new_raw)
        unreadable = source.unreadable + unreadable
        filenames = old_metadata["filename"].iloc[keep_rows].tolist() + encoded
        if not filenames:
            raise InputError(f"{source.root}: no readable images, so nothing was indexed")
        info.count, info.index_type = len(filenames), choose_index_type(index_type, len(filenames))
        info.last_run = {
            "new": len(encoded),
            "already_indexed": len(keep_rows),
            "removed": len(old_metadata) - len(keep_rows),
            "unreadable": unreadable,
        }
        metadata = build_metadata(filenames, source)
        embeddings, vectors = write_data_files(
            output, info, previous, old_embeddings, keep_rows, new_raw, metadata
        )
        write_info(output, info)
    finally:
        new_raw.unlink(missing_ok=True)
    return metadata, embeddings, vectors


# --- searching ---


@dataclass
class SearchResult:
    """One indexed image found by a search, with its cosine similarity to the query."""

    filename: str  # relative to the index's image root
    score: float
    text: str | None = None  # the CSV's caption, for an index built from a CSV

    def to_dict(self) -> dict[str, object]:
        """{"filename", "score"}, plus "text" when the index has texts."""
        document: dict[str, object] = {"filename": self.filename, "score": self.score}
        if self.text is not None:
            document["text"] = self.text
        return document


def results_document(query: str, results: list[SearchResult]) -> dict[str, object]:
    """The JSON answer of the search command and the web API: the query and its ranked results."""
    return {"query": query, "results": [result.to_dict() for result in results]}


class RetrievalIndex:
    """An index directory opened for search; the model is loaded on the first text or image query."""

    def __init__(
        self,
        directory: Path,
        info: IndexInfo,
        metadata: pd.DataFrame,
        embeddings: np.ndarray,
        vectors: faiss.Index,
        model=None,
        processor=None,
        model_name_or_path: str | Path | None = None,
        device: str | torch.device | None = None,
        info_stamp: InfoStamp | None = None,
    ):
        self.directory = Path(directory)
        self.info = info
        self.metadata = metadata
        self.embeddings = embeddings  # [n, dim], memory-mapped
        self.vectors = vectors
        self.model, self.processor = model, processor
        self.model_name_or_path = str(model_name_or_path or info.model_name_or_path)
        self.device = device
        self.info_stamp = info_stamp  # of the index.json read, to tell when an index run replaced it
        if info.index_type == "approximate":
            faiss.extract_index_ivf(vectors).nprobe = info.ivf_probed_lists

    build = staticmethod(build_index)  # create or update an index; see `build_index`

    @classmethod
    def load(
        cls,
        directory: str | Path,
        model_name_or_path: str | Path | None = None,
        device: str | torch.device | None = None,
        memory_map: bool = True,
    ) -> "RetrievalIndex":
        """Open an index; queries will use `model_name_or_path` (default: the recorded model).

        With `memory_map` the faiss index is mapped, not read: opening is instant and a query reads
        only what it needs (an IVF index: its probed lists), from disk when not yet cached. A
        server reads it into memory instead (`memory_map=False`), for steady latency.
        """
        directory = Path(directory)
        for attempt in (1, 2):
            stamp = read_info_stamp(directory)  # before reading: a later replacement then shows as a change
            try:
                info, embeddings, metadata, vectors = read_index_files(directory, memory_map)
                break
            except InputError:
                # An index run may have replaced index.json and deleted the files it named while
                # they were read: then read the new one, once.
                if attempt == 2 or read_info_stamp(directory) == stamp:
                    raise
        return cls(
            directory, info, metadata, embeddings, vectors, None, None, model_name_or_path, device, stamp
        )

    def __len__(self) -> int:
        return self.info.count

    @property
    def image_root(self) -> Path:
        """The directory the indexed filenames are relative to."""
        return Path(self.info.image_root)

    def load_model(self) -> tuple[object, object]:
        """The model and processor for queries, loaded once; refuse one other than the index's."""
        if self.model is None:
            hint = f"the index was built with {self.info.model_name_or_path}; pass its new path if it moved"
            try:
                model, processor = load_model_and_processor(self.model_name_or_path, self.device)
            except ValueError as error:  # InputError and CheckpointError
                raise InputError(f"{error}; {hint}") from error
            if model_fingerprint(model, processor) != self.info.model_fingerprint:
                raise InputError(
                    f"{self.model_name_or_path} is not the model that built {self.directory} "
                    f"(fingerprint {self.info.model_fingerprint[:12]}); it was changed or is another model"
                )
            self.model, self.processor = model, processor
        return self.model, self.processor

    def search_embedding(self, query_embed: np.ndarray | torch.Tensor, top_k: int = 10) -> list[SearchResult]:
        """The `top_k` indexed images with the largest inner product with an L2-normalised [dim] query."""
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        query = np.asarray(query_embed, dtype=np.float32).reshape(1, -1)  # [1, dim]
        if query.shape[1] != self.info.dim:
            raise InputError(f"the query has {query.shape[1]} dimensions, the index {self.info.dim}")
        scores, rows = self.vectors.search(query, min(top_k, self.info.count))
        texts = self.metadata["text"] if self.info.has_text else None
        return [
            SearchResult(
                self.metadata["filename"].iat[row], float(score), None if texts is None else texts.iat[row]
            )
            for score, row in zip(scores[0], rows[0], strict=True)
            if row >= 0  # IVF returns -1 when the probed lists hold fewer than top_k vectors
        ]

    def search_text(self, text: str, top_k: int = 10, max_length: int = 64) -> list[SearchResult]:
        """The `top_k` indexed images most similar to a text."""
        if not text.strip():
            raise InputError("the query text is empty")
        model, processor = self.load_model()
        return self.search_embedding(encode_texts(model, processor, [text], max_length=max_length)[0], top_k)

    def search_image(self, image: ImageInput, top_k: int = 10) -> list[SearchResult]:
        """The `top_k` indexed images most similar to an image (a file path or a PIL image)."""
        model, processor = self.load_model()
        return self.search_embedding(encode_images(model, processor, [image])[0], top_k)
