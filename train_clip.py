"""Train a Chinese CLIP (BertCLIP) model from a JSON arg file.

python train_clip.py --train_args_file train_args/train_clip.json
torchrun --nproc_per_node 8 train_clip.py --train_args_file train_args/train_clip.json
"""

import argparse
import logging

from component.argument import describe_arguments, parse_train_args
from datatools.errors import report_user_errors


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

    # what the user must fix is one line (exit 2, or 1 on bad data); anything else keeps its traceback
    return report_user_errors(lambda: run_training(*parse_train_args(options.train_args_file)))


if __name__ == "__main__":
    main()
