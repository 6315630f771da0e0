"""Evaluate a model without training: retrieval recall on a test set, and zero-shot classification.

    python evaluate.py --model_name_or_path DIR --test_file data/test.csv --image_path data/images
    python evaluate.py --model_name_or_path DIR --test_file MUGE/valid_texts.jsonl   # + valid_imgs.tsv
    python evaluate.py --model_name_or_path DIR --test_file MUGE/lmdb/valid          # Chinese-CLIP LMDB
    python evaluate.py --model_name_or_path DIR --test_file "shards/{00000..00009}.tar"  # webdataset
    python evaluate.py --model_name_or_path output/run                               # its own test_file
    python evaluate.py --model_name_or_path DIR --zeroshot_labels label_cn.txt --zeroshot_images val/

Retrieval reports two sets of numbers: "toolkit", the recall training's evaluation reports
(fractions; one caption row per pair, an image with several texts is one image), and "cn_clip",
Chinese-CLIP's protocol as its evaluation scripts compute it (percentages: text-to-image and
image-to-text R@1/5/10, each direction's mean, and MR, the mean of all six).
"""

import argparse
import json
import logging
import sys

from component.cli import model_script_parser, pick_device, positive_int, run_printing_script
from component.encoding import load_model_and_processor
from component.evaluation.eval_data import open_source, read_eval_set
from component.evaluation.report import format_report, resolve_test_data
from component.evaluation.retrieval_eval import evaluate_retrieval
from component.evaluation.zeroshot import labelled_images, read_labels, read_templates, zeroshot_accuracy
from datatools.atomic import write_json_atomic

DEFAULT_MAX_LENGTH = 64  # tokens per text where neither --max_length nor the training run says


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = model_script_parser(
        __doc__, model_help="a model directory (a trained run's output directory, or convert_checkpoint.py's)"
    )
    parser.add_argument(
        "--test_file",
        help="a CSV (text, filename), a Chinese-CLIP *_texts.jsonl (with *_imgs.tsv beside it) or "
        "LMDB directory, or webdataset shards (a .tar, brace pattern, glob or directory); default: the "
        "test_file the model was trained with (toolkit_args.json)",
    )
    parser.add_argument(
        "--image_path", help="the folder a CSV's filenames (and --zeroshot_images CSV's) are in"
    )
    parser.add_argument(
        "--zeroshot_labels", help="class names, one per line (label_cn.txt): zero-shot accuracy"
    )
    parser.add_argument(
        "--zeroshot_images",
        help="for --zeroshot_labels: a folder with one subfolder per class (sorted order = label "
        "order, as ImageNet's) or a CSV with columns filename,label",
    )
    parser.add_argument(
        "--templates",
        help="zero-shot prompt templates: a file with one per line ('{}' is the class name), or "
        "'cn_clip' for Chinese-CLIP's (from the installed cn_clip); default: the toolkit's",
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, help="texts or images per batch")
    parser.add_argument(
        "--max_length",
        type=positive_int,
        help="tokens per text; default: the model's training max_seq_length, else 64",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--output", help="also write the metrics as JSON to this file (atomically)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.zeroshot_labels and not args.zeroshot_images:
        parser.error(
            "--zeroshot_labels needs --zeroshot_images (a class-folder directory or a filename,label CSV)"
        )
    if args.zeroshot_images and not args.zeroshot_labels:
        parser.error("--zeroshot_images needs --zeroshot_labels")
    return args


def run(args: argparse.Namespace) -> dict:
    """Load the model, evaluate retrieval (and zero-shot where asked), print and save the metrics."""
    # 1. What to evaluate: retrieval unless only zero-shot is asked for.
    wants_retrieval = args.test_file is not None or not args.zeroshot_labels
    data = (
        resolve_test_data(args.model_name_or_path, args.test_file, args.image_path) if wants_retrieval else {}
    )
    templates = read_templates(args.templates) if args.zeroshot_labels else None
    eval_set = None
    if data:
        eval_set = read_eval_set(open_source(data["test_file"], data["image_path"], data["csv_encoding"]))

    # 2. The model, then the metrics.
    model, processor = load_model_and_processor(args.model_name_or_path, pick_device(args.device))
    max_positions = model.config.text_config.max_position_embeddings
    max_length = args.max_length or min(data.get("max_seq_length") or DEFAULT_MAX_LENGTH, max_positions)
    options = dict(batch_size=args.batch_size, max_length=max_length, progress=not args.no_progress)
    results = {}
    if eval_set is not None:
        results = evaluate_retrieval(model, processor, eval_set, **options)
        results["data"] = {"test_file": str(data["test_file"]), **results["data"]}
    if args.zeroshot_labels:
        labels = read_labels(args.zeroshot_labels)
        images, targets = labelled_images(args.zeroshot_images, labels, args.image_path)
        results["zeroshot"] = zeroshot_accuracy(
            model, processor, labels, images, targets, templates, **options
        )

    # 3. Report.
    if args.output:  # before printing, so that a closed pipe cannot lose the file
        write_json_atomic(args.output, results)
    print(json.dumps(results, ensure_ascii=False, indent=2) if args.json else format_report(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and evaluate; bad input ends with one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    return run_printing_script(lambda: run(args))


if __name__ == "__main__":
    main()
