"""The machine the figures were taken on, and how busy it was.

torch and transformers are imported only where needed, so that benchmarks which never touch a
model (bench_download.py) can use `cpu_model` without loading them.
"""

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from PIL import Image


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, or what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """The CPU model, core count, accelerator and library versions the figures depend on."""
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
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
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
