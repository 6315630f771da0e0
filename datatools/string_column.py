"""Strings packed into one buffer, which forked DataLoader workers share without copying; torch-free,
so that the data tools and training's readers use the same one."""

from array import array
from collections.abc import Iterable

import numpy as np


class StringColumn:
    """Strings packed into one UTF-8 buffer plus offsets.

    A list of millions of Python strings is copied page by page into every forked DataLoader
    worker as reference counts change; two numpy arrays are shared and never written.
    """

    def __init__(self, strings: Iterable[str] = ()):
        data = bytearray()
        ends = array("q", [0])
        for string in strings:
            data += str(string).encode("utf-8")
            ends.append(len(data))
        self._set(data, ends)

    def _set(self, data: bytearray, ends: array) -> None:
        # Views, not copies: the bytearray's spare capacity (an eighth at most) costs less than
        # a second copy of a buffer that can hold gigabytes.
        self.buffer = np.frombuffer(data, dtype=np.uint8)
        self.offsets = np.frombuffer(ends, dtype=np.int64)
        self.buffer.flags.writeable = self.offsets.flags.writeable = False

    @classmethod
    def pack_pairs(cls, pairs: Iterable[tuple[str, str]]) -> tuple["StringColumn", "StringColumn"]:
        """Two columns filled in one pass over `pairs`, never holding the rows as Python objects."""
        first_data, second_data = bytearray(), bytearray()
        first_ends, second_ends = array("q", [0]), array("q", [0])
        for first, second in pairs:
            first_data += first.encode("utf-8")
            first_ends.append(len(first_data))
            second_data += second.encode("utf-8")
            second_ends.append(len(second_data))
        columns = cls.__new__(cls), cls.__new__(cls)
        columns[0]._set(first_data, first_ends)
        columns[1]._set(second_data, second_ends)
        return columns

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:end].tobytes().decode("utf-8")

    def tolist(self) -> list[str]:
        return [self[i] for i in range(len(self))]
