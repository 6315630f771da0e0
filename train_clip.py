"""Train a Chinese CLIP (BertCLIP) model from a JSON arg file.

python train_clip.py --train_args_file train_args/train_clip.json
torchrun --nproc_per_node 8 train_clip.py --train_args_file train_args/train_clip.json

Any arg-file key can be overridden on the command line, with the same checks as in the file:
python train_clip.py --train_args_file train_args/train_clip.json --learning_rate 1e-4 --output_dir out
Values are converted to the key's type: numbers, booleans as true/false/1/0/yes/no (a boolean key alone,
`--bf16`, means true), null for an optional key, lists such as report_to comma-separated
(`--report_to tensorboard,wandb`) or as JSON. The arg file must be UTF-8 JSON; transformers 4.x keys
(no_cuda, warmup_ratio, evaluation_strategy, ...) are read under their new names with a warning.
"""

import argparse
import logging
import os
import shlex
import sys

from component.training.arguments import command_line_overrides, describe_arguments, parse_train_args
from datatools.errors import report_user_errors


def main(argv: list[str] | None = None) -> dict:
    """Parse the arg file and overrides, train, evaluate and save; returns the final metrics."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --train would otherwise be taken for --train_args_file
        usage="%(prog)s --train_args_file FILE [--KEY VALUE ...] | --list_args",
    )
    parser.add_argument("--train_args_file", help="JSON file of training arguments")
    parser.add_argument("--list_args", action="store_true", help="list the toolkit's arg-file keys and exit")
    options, override_tokens = parser.parse_known_args(argv)
    if options.list_args:
        print(describe_arguments())
        return {}
    if not options.train_args_file:
        parser.error("--train_args_file is required")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    def parse():
        return parse_train_args(options.train_args_file, overrides=command_line_overrides(override_tokens))

    # what the user must fix is one line (exit 2, or 1 on bad data); anything else keeps its traceback
    arguments = report_user_errors(parse)
    from component.training.run import run_training  # heavy imports after the arguments are read

    # named when Ctrl-C stops the run; torchrun's own command line is unknown here ("the same command")
    words = sys.argv[1:] if argv is None else argv
    command = None if "WORLD_SIZE" in os.environ else shlex.join(["python", "train_clip.py", *words])
    return report_user_errors(lambda: run_training(*arguments, resume_command=command))


if __name__ == "__main__":
    main()
