"""The index a server answers from, swapped for a newer one when an index run has replaced it.

Free of any HTTP framework: the search service (component.retrieval.service) and the legacy
http.server reference in benchmarks/ use the same reload policy. Each request first compares the
index's index.json with the one it was opened from (one stat call); after an index run has
replaced it, the index is opened again and swapped in. While one request reloads, the others are
answered from the index in use; a reload that fails keeps the index in use and says why, once
per index.json.
"""

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from component.errors import InputError
from component.retrieval.index import RetrievalIndex
from component.retrieval.store import read_info_stamp


@dataclass(frozen=True)
class ServedIndex:
    """An index and what a server derives from it, replaced as one when the index is reloaded."""

    index: RetrievalIndex
    filenames: frozenset[str]
    image_root: Path

    @classmethod
    def of(cls, index: RetrievalIndex) -> "ServedIndex":
        """The index with its set of filenames and its resolved image root."""
        return cls(index, frozenset(index.metadata["filename"]), index.image_root.resolve())

    def indexed_file(self, filename: str) -> Path | None:
        """The file of an indexed image, or None when `filename` is not one or lies outside the root."""
        if filename not in self.filenames:
            return None
        path = (self.image_root / filename).resolve()
        return path if path.is_relative_to(self.image_root) and path.is_file() else None


def reopen(index: RetrievalIndex) -> RetrievalIndex:
    """The index directory of `index` opened again, read into memory, sharing its loaded model."""
    new_index = RetrievalIndex.load(index.directory, index.model_name_or_path, index.device, memory_map=False)
    if new_index.info.model_fingerprint != index.info.model_fingerprint:
        raise InputError(
            f"it was rebuilt with another model ({new_index.info.model_name_or_path}); "
            "restart the server to search it"
        )
    new_index.model, new_index.processor = index.model, index.processor
    return new_index


class IndexReloader:
    """Holds the served index; `current()` swaps in the index directory's newer index first."""

    def __init__(self, index: RetrievalIndex):
        self.served = ServedIndex.of(index)
        self.tried_stamp = index.info_stamp  # of the last index.json opened or tried
        self.reload_lock = threading.Lock()

    def current(self) -> ServedIndex:
        """The index to answer a request from, reloaded first when an index run has replaced it."""
        served = self.served
        stamp = read_info_stamp(served.index.directory)
        if stamp == self.tried_stamp or not self.reload_lock.acquire(blocking=False):
            return served
        try:
            if stamp != self.tried_stamp:  # not reloaded by another request meanwhile
                self.tried_stamp = stamp
                self.reload(self.served.index)
            return self.served
        finally:
            self.reload_lock.release()

    def reload(self, index: RetrievalIndex) -> None:
        """Swap in the index directory's current index; on any error keep `index` and say why."""
        try:
            new_index = reopen(index)
        except Exception as error:  # whatever went wrong, the index in use still answers
            print(
                f"warning: cannot reload {index.directory} ({error}); still serving its "
                f"{len(index)} images of generation {index.info.generation}",
                file=sys.stderr,
                flush=True,
            )
            return
        self.served = ServedIndex.of(new_index)
        print(
            f"reloaded {index.directory}: {len(new_index)} images, generation {new_index.info.generation}",
            file=sys.stderr,
            flush=True,
        )
