"""A retrieval index on disk: its description (index.json), its data files and their generations.

An index directory holds:

    index.json             which model built it (path and fingerprint), the image root, the index
                           type, the names of the three data files below, and the last run's counts
    embeddings-<G>.npy     L2-normalised image embeddings [n, dim], float16 or float32, memory-mapped
    metadata-<G>.csv       one row per embedding: filename (relative to the image root), and text
                           when the images came from a CSV
    vectors-<G>.faiss      the faiss index over the same rows
    .index.lock            locked (flock) by the index run in progress, so that two runs never overlap

A run writes new data files under a new generation number G and only then replaces index.json
(a temporary file renamed over it), so an interrupted run leaves the previous index whole.
"""

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args, get_origin

import faiss
import numpy as np
import pandas as pd

from component.errors import InputError
from datatools.atomic import sync_path, write_json_atomic

EmbeddingDtype = Literal["float16", "float32"]
EMBEDDING_DTYPES: tuple[EmbeddingDtype, ...] = ("float16", "float32")
FORMAT_VERSION = 1
INFO_FILE = "index.json"
LOCK_FILE = ".index.lock"  # held by the index run in progress
DATA_FILE_KINDS = {"embeddings": ".npy", "metadata": ".csv", "vectors": ".faiss"}
ROWS_PER_CHUNK = 65_536  # rows copied or added to faiss at once, to bound memory


@dataclass
class IndexInfo:
    """What index.json records about an index directory."""

    model_name_or_path: str
    model_fingerprint: str
    image_root: str
    dim: int
    dtype: EmbeddingDtype
    index_type: Literal["exact", "approximate"]  # the faiss index in use
    count: int = 0
    generation: int = 0
    files: dict[str, str] = field(default_factory=dict)  # kind ("embeddings", ...) -> file name
    has_text: bool = False
    ivf_lists: int = 0  # 0 for the exact index
    ivf_probed_lists: int = 0
    last_run: dict = field(default_factory=dict)  # counts and unreadable images of the latest build
    format_version: int = FORMAT_VERSION

    def path(self, directory: Path, kind: str) -> Path:
        """Where the data file of `kind` is."""
        return directory / self.files[kind]


def read_info(directory: str | Path) -> IndexInfo | None:
    """The index.json of `directory`, or None when there is none."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('format_version')}, expected {FORMAT_VERSION}")
        info = IndexInfo(**data)
        check_field_types(info)
        return info
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{path}: not a usable index description ({error}); rebuild the index") from error


def check_field_types(info: IndexInfo) -> None:
    """Raise ValueError naming the first field of `info` whose value is not of its declared type."""
    for item in fields(IndexInfo):
        value = getattr(info, item.name)
        if get_origin(item.type) is Literal:
            valid = value in get_args(item.type)
        else:
            valid = isinstance(value, get_origin(item.type) or item.type)
        if not valid:
            raise ValueError(f"{item.name} is {value!r}")


InfoStamp = tuple[int, int, int]  # index.json's inode, modification time (ns) and size


def read_info_stamp(directory: str | Path) -> InfoStamp | None:
    """What tells index.json from the one that replaces it, from one stat call; None when missing.

    Each run writes a new file and renames it over the old one, so even a rebuild that starts again
    at generation 1 gets a new inode.
    """
    try:
        stat = (Path(directory) / INFO_FILE).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def write_info(directory: Path, info: IndexInfo) -> None:
    """Replace index.json atomically (the shared temporary-file, sync and rename writer)."""
    write_json_atomic(directory / INFO_FILE, asdict(info))  # synced, the rename included


def data_file_name(kind: str, generation: int) -> str:
    """The name of a data file: embeddings-000003.npy, metadata-000003.csv or vectors-000003.faiss."""
    return f"{kind}-{generation:06d}{DATA_FILE_KINDS[kind]}"


def remove_stale_files(directory: Path, info: IndexInfo) -> None:
    """Delete data files of other generations and temporary files (from this or an interrupted run)."""
    current = set(info.files.values())
    for path in directory.iterdir():
        kind, _, rest = path.name.partition("-")
        stale_data = kind in DATA_FILE_KINDS and rest[:6].isdigit() and path.name not in current
        if stale_data or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)


def check_output_directory(output: Path) -> None:
    """Refuse an output that is a file, or a directory of other files than an index's.

    Every index run leaves its lock file, so a directory with the lock file but no index.json was
    left by a run that failed or is still going: it is accepted, and that run's lock decides.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    ours = (output / INFO_FILE).exists() or (output / LOCK_FILE).exists()
    if output.is_dir() and not ours and any(output.iterdir()):
        raise InputError(
            f"{output}: exists and is not a retrieval index; choose a new or empty --output directory"
        )


@contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """Hold the lock of an index directory (created if missing) for one index run; refuse at once
    when another run holds it.

    The lock is an flock on the lock file, not the file's existence: the kernel releases it when
    the holder exits or is killed, so a lock file left behind blocks no later run.
    """
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a")
    except OSError as error:
        raise InputError(f"{directory}: cannot create the directory or its lock file ({error})") from error
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{directory}: another index run is in progress (it holds {path}); "
                "wait for it to finish, then run again"
            ) from None
        yield  # closing the file releases the lock


def write_embeddings(
    path: Path, old_embeddings: np.ndarray, keep_rows: np.ndarray, new_raw: Path
) -> np.ndarray:
    """Write the kept old rows, then the rows of the raw file `new_raw`, to a .npy file; map it read-only."""
    dtype, dim = old_embeddings.dtype, old_embeddings.shape[1]
    new_embeddings = (
        np.memmap(new_raw, dtype=dtype, mode="r").reshape(-1, dim) if new_raw.stat().st_size else None
    )
    new_count = 0 if new_embeddings is None else len(new_embeddings)
    output = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(keep_rows) + new_count, dim))
    for start in range(0, len(keep_rows), ROWS_PER_CHUNK):
        rows = keep_rows[start : start + ROWS_PER_CHUNK]
        output[start : start + len(rows)] = old_embeddings[rows]
    for start in range(0, new_count, ROWS_PER_CHUNK):
        end = min(start + ROWS_PER_CHUNK, new_count)
        output[len(keep_rows) + start : len(keep_rows) + end] = new_embeddings[start:end]
    del new_embeddings
    output.flush()
    del output
    sync_path(path)
    return np.load(path, mmap_mode="r")


def write_vectors(directory: Path, info: IndexInfo, vectors: faiss.Index) -> None:
    """Write the faiss index as this generation's vectors file and name it in `info.files`."""
    info.files["vectors"] = data_file_name("vectors", info.generation)
    faiss.write_index(vectors, str(info.path(directory, "vectors")))
    sync_path(info.path(directory, "vectors"))


def write_metadata(directory: Path, info: IndexInfo, metadata: pd.DataFrame) -> None:
    """Write the metadata table as this generation's metadata file and name it in `info.files`."""
    info.files["metadata"] = data_file_name("metadata", info.generation)
    metadata.to_csv(info.path(directory, "metadata"), index=False)
    sync_path(info.path(directory, "metadata"))


def read_data_files(directory: Path, info: IndexInfo) -> tuple[np.ndarray, pd.DataFrame]:
    """The memory-mapped embeddings and the metadata table of an index."""
    try:
        embeddings = np.load(info.path(directory, "embeddings"), mmap_mode="r")
        metadata = pd.read_csv(info.path(directory, "metadata"), dtype=str, keep_default_na=False)
    except (OSError, KeyError, ValueError) as error:
        raise InputError(
            f"{directory}: the index files are missing or damaged ({error}); rebuild it"
        ) from error
    if len(embeddings) != info.count or len(metadata) != info.count:
        raise InputError(f"{directory}: the index files disagree with {INFO_FILE}; rebuild the index")
    return embeddings, metadata


def read_vectors(directory: Path, info: IndexInfo, memory_map: bool = True) -> faiss.Index:
    """The faiss index of an index directory, memory-mapped or read into memory."""
    try:
        flags = faiss.IO_FLAG_MMAP_IFC if memory_map else 0
        vectors = faiss.read_index(str(info.path(directory, "vectors")), flags)
    except (KeyError, RuntimeError) as error:
        raise InputError(f"{directory}: cannot read the faiss index ({error}); rebuild it") from error
    if vectors.ntotal != info.count:
        raise InputError(f"{directory}: the faiss index disagrees with {INFO_FILE}; rebuild the index")
    return vectors


def read_index_files(
    directory: Path, memory_map: bool = True
) -> tuple[IndexInfo, np.ndarray, pd.DataFrame, faiss.Index]:
    """index.json and the embeddings, metadata and faiss index it names (see `read_vectors`)."""
    info = read_info(directory)
    if info is None:
        raise InputError(
            f"{directory}: not a retrieval index (no {INFO_FILE}); build one with `retrieval.py index`"
        )
    embeddings, metadata = read_data_files(directory, info)
    return info, embeddings, metadata, read_vectors(directory, info, memory_map)
