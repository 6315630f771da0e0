"""Train a Chinese CLIP (BertCLIP) model from a JSON arg file.

python train_clip.py --train_args_file train_args/train_clip.json
torchrun --nproc_per_node 8 train_clip.py --train_args_file train_args/train_clip.json
"""

import argparse
import logging
import sys

from component.argument import ArgumentError, describe_arguments, parse_train_args
from component.dataset import BadImageError, DataError
from component.interop import CheckpointError

USER_ERRORS = (ArgumentError, CheckpointError, DataError, FileNotFoundError, BadImageError)


def main(argv: list[str] | None = None) -> dict:
    """Parse the arg file, train, evaluate and save; returns the final metrics."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train_args_file", help="JSON file of training arguments")
    parser.add_argument("--list_args", action="store_true", help="list the toolkit's arg-file keys and exit")
    options = parser.parse_args(argv)
    if options.list_args:
        print(describe_arguments())
        return {}
    if not options.train_args_file:
        parser.error("--train_args_file is required")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from component.training import run_training  # heavy imports after the arguments are read

    try:
        return run_training(*parse_train_args(options.train_args_file))
    except USER_ERRORS as error:  # what the user must fix; anything else is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2 if not isinstance(error, BadImageError) else 1) from None


if __name__ == "__main__":
    main()
