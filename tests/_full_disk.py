"""Helpers for full-disk tests: a simulated disk that runs out of space, and a real tiny tmpfs."""

import builtins
import errno
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class SmallDisk:
    """An `open` that writes real files but raises ENOSPC once `free_bytes` have been written.

    Patch it over a module's `open` (`monkeypatch.setattr(module, "open", disk.open, raising=False)`);
    reading is left to the real `open`.
    """

    def __init__(self, free_bytes: int) -> None:
        self.free_bytes = free_bytes
        self.full = False
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            if size > self.free_bytes:
                self.full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.free_bytes -= size

    def open(self, file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, **kwargs):
        if not set(mode) & set("wxa+"):
            return builtins.open(file, mode, buffering, encoding, errors, newline, **kwargs)
        raw = _SmallDiskFile(file, mode.replace("b", "").replace("t", ""), self)
        buffered = io.BufferedWriter(raw)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline=newline)


class _SmallDiskFile(io.FileIO):
    def __init__(self, file, mode: str, disk: SmallDisk) -> None:
        super().__init__(file, mode)
        self._disk = disk

    def write(self, data) -> int:
        self._disk.take(len(data))
        return super().write(data)


@contextmanager
def tmpfs(directory: Path, size: str = "64k") -> Iterator[Path]:
    """A real file system of `size` mounted on `directory` (skips the test where mounting is not allowed)."""
    directory.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    try:
        mounted = subprocess.run(command, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def leftovers(directory: Path) -> list[str]:
    """Hidden temp files (`.<hex>.part`, `.<hex>.tmp`) anywhere under `directory`."""
    return sorted(p.name for p in directory.rglob(".*") if p.suffix in (".part", ".tmp"))
