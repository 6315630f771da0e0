"""The machine the figures were taken on, and how busy it was."""

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from PIL import Image


def machine() -> dict[str, object]:
    """The CPU model, core count, accelerator and library versions the figures depend on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": Image.__version__,
    }


def load_average() -> float:
    """The one-minute load average: other work on the machine slows every figure."""
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Run with `count` intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
