"""A CSV's usable rows converted once into memory-mapped arrays, shared by every process.

The first run reads the CSV (`read_image_text_csv`) and writes the packed columns as .npy files
into a directory named by a key of the CSV (its resolved path, size, modification time, a
digest of its first and last 64 KiB, the encoding asked for and the format version). Later runs,
every rank and every DataLoader worker map those files: start-up no longer grows with the
rows, and the pages are shared through the page cache instead of copied per process.

One process builds a store, under a file lock; the others wait on the lock and then map it. The
store is written to a temporary directory and renamed, so a killed build leaves no half store.
A changed CSV has a new key, so it is converted again; old stores are never deleted.
"""

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from component.training.dataset import DataError, ImageTextRows, StringColumn, read_image_text_csv
from datatools.atomic import sync_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EDGE_BYTES = 1 << 16  # the head and tail hashed into the key


def csv_key(path: Path, encoding: str | None) -> str:
    """A key that changes when the CSV changes (size, mtime or the bytes at either end)."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=12)
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, encoding, FORMAT_VERSION)
    digest.update(repr(identity).encode())
    with open(path, "rb") as file:
        digest.update(file.read(EDGE_BYTES))
        file.seek(max(0, stat.st_size - EDGE_BYTES))
        digest.update(file.read(EDGE_BYTES))
    return digest.hexdigest()


def store_root(csv_path: Path, fallback: Path) -> Path:
    """Beside the CSV (`<name>.rows/`) where that folder is writable, else `fallback`."""
    beside = csv_path.parent
    return beside / f"{csv_path.name}.rows" if os.access(beside, os.W_OK) else fallback


def _write_store(rows: ImageTextRows, directory: Path) -> None:
    """The columns as .npy files and meta.json, in a temporary folder renamed into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    for name, column in (("texts", rows.texts), ("filenames", rows.filenames)):
        np.save(temporary / f"{name}.buffer.npy", column.buffer)
        np.save(temporary / f"{name}.offsets.npy", column.offsets)
    meta = {"rows": len(rows), "dropped_blank_text": rows.dropped_blank_text, "source": rows.source}
    (temporary / "meta.json").write_text(json.dumps(meta))
    for file in temporary.iterdir():
        sync_path(file)
    os.rename(temporary, directory)


def _mapped_column(directory: Path, name: str) -> StringColumn:
    column = StringColumn.__new__(StringColumn)
    column.buffer = np.load(directory / f"{name}.buffer.npy", mmap_mode="r")
    column.offsets = np.load(directory / f"{name}.offsets.npy", mmap_mode="r")
    return column


def _map_store(directory: Path) -> ImageTextRows:
    meta = json.loads((directory / "meta.json").read_text())
    texts, filenames = _mapped_column(directory, "texts"), _mapped_column(directory, "filenames")
    return ImageTextRows(texts, filenames, meta["source"], meta["dropped_blank_text"])


def load_rows(
    path: str | Path, encoding: str | None, fallback_dir: Path, process_index: int = 0
) -> ImageTextRows:
    """The CSV's rows, memory-mapped from its row store (built on first use, by one process)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    directory = store_root(path, fallback_dir) / csv_key(path, encoding)
    if (directory / "meta.json").is_file():
        rows = _map_store(directory)
        if rows.dropped_blank_text and process_index == 0:
            logger.warning(f"{path}: dropped {rows.dropped_blank_text} row(s) with blank text or filename")
        return rows
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait here
        if not (directory / "meta.json").is_file():  # the meta is written before the rename
            rows = read_image_text_csv(path, encoding)
            _write_store(rows, directory)
            logger.info(f"{path}: {len(rows)} rows converted into the row store {directory}")
    return _map_store(directory)
