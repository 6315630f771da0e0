"""Small pieces the command-line scripts share: their parser, argument types, device choice, image listing,
and how a printing script ends."""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from component.encoding import default_device
from component.errors import InputError
from datatools.errors import report_user_errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIGPIPE_EXIT_STATUS = 141  # 128 + SIGPIPE (13): what a shell reports for a tool its reader closed on
CHECKPOINT_HELP = "a BertCLIP, ChineseCLIP or original CLIP-Chinese checkpoint: a directory or hub name"


def model_script_parser(
    description: str | None, model_help: str = CHECKPOINT_HELP
) -> argparse.ArgumentParser:
    """A script's parser: its module docstring as the description, and the required
    --model_name_or_path."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name_or_path", required=True, help=model_help)
    return parser


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def pick_device(requested: str | None) -> torch.device:
    """The device asked for, after checking it exists, or the default."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(requested) if requested else default_device()


def list_images(directory: str | Path) -> list[Path]:
    """Image files (by suffix) under a directory and its subdirectories, sorted.

    Only regular files (or links to them) are listed: a FIFO or a device named like an image would
    block whoever opens it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such directory")
    images = sorted(
        path for path in directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not images:
        raise InputError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


Result = TypeVar("Result")


def run_printing_script(work: Callable[[], Result]) -> Result:
    """`report_user_errors(work)` for a script that prints to stdout: bad input ends with one line
    and exit status 2, and a reader that stops early (`| head`) ends the run quietly with exit
    status 141 (SIGPIPE's)."""
    try:
        result = report_user_errors(work)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
    except BrokenPipeError:
        # As Python's docs advise (signal module, "Note on SIGPIPE"): point stdout at devnull so
        # that the flush at exit cannot fail again, and leave without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(SIGPIPE_EXIT_STATUS) from None
    return result
