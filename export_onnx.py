"""Export a checkpoint's text and image encoders to ONNX, checked against PyTorch with ONNX Runtime.

    python export_onnx.py --model_name_or_path DIR --output onnx_dir
    python export_onnx.py --model_name_or_path DIR --output onnx_dir_fp16 --fp16

Writes text_encoder.onnx (input_ids, attention_mask -> text_features, text_embeds),
image_encoder.onnx (pixel_values -> image_features, image_embeds), the processor, and
onnx_export.json with the logit scale. Batch size is dynamic in both graphs, sequence length in
the text one. Before anything is written, both graphs run in ONNX Runtime (CPU) beside PyTorch:
the text encoder at batch 1 and 3 for lengths 1, 2, 3, the powers of two and the model's maximum,
and at batch 64 for lengths 1 and 16; the image encoder at batch 1, 3 and 64. In float32 the
outputs must agree within 1e-4 (max abs difference), in float16 each embedding's cosine with
PyTorch's float32 one must be at least 0.999; otherwise the script stops with exit status 1.

Needs the optional packages: pip install '.[onnx]'.
"""

import argparse
from pathlib import Path

from component.cli import model_script_parser, pick_device
from component.encoding import load_model_and_processor
from component.formats.onnx_export import MIN_OPSET, check_opset, check_output, export_onnx, require_onnx
from datatools.errors import report_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = model_script_parser(__doc__)
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="directory for the export: new, empty, or holding an earlier export (its files are replaced)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset version, at least {MIN_OPSET} (default: the exporter's own, 20 with torch 2.13)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and arithmetic; inputs and outputs stay float32",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where PyTorch traces the model and computes the reference outputs (default: %(default)s)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Check the packages and arguments, load the model, export, check and write."""
    require_onnx()
    check_opset(args.opset)
    check_output(args.output)  # before the minutes spent loading and exporting
    model, processor = load_model_and_processor(args.model_name_or_path, pick_device(args.device))
    model = model.float()  # a checkpoint saved in bf16 loads as bf16; the graphs take float32 inputs
    export_onnx(model, processor, args.output, opset=args.opset, float16=args.fp16)
    print(f"wrote the ONNX export to {args.output}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run; a bad input ends with "error: ..." and exit status 2,
    a graph out of tolerance with exit status 1."""
    args = parse_args(argv)
    report_user_errors(lambda: run(args))


if __name__ == "__main__":
    main()
