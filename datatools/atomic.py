"""Files that appear whole or not at all: write a temporary file, sync it, rename it into place."""

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", sync: bool = True) -> Iterator[IO]:
    """A file that becomes `path` only when the block completes; on an error nothing is left.

    sync: flush the data to disk before the rename and the rename after it, so that a power cut
    leaves the old file or the whole new one. Bulk writers of many small, re-creatable files
    (downloaded images) skip it.
    """
    path = Path(path)
    # Hidden, and unique per call since threads of one process may write beside each other. It does
    # not repeat `path.name`, so any name the file system takes (up to 255 bytes) can be written.
    temporary = path.with_name(f".{uuid.uuid4().hex}.tmp")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(temporary, mode.replace("w", "x"), encoding=encoding) as file:
            yield file
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync:  # the rename too, so that a caller may delete what the new file replaces
        sync_path(path.parent)


def sync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: str | Path, data) -> None:
    """Write `data` as JSON to `path` atomically."""
    with atomic_file(path, "w") as file:
        json.dump(data, file, ensure_ascii=False, indent=2)
