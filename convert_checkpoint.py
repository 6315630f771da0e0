"""Convert between the toolkit's model directories and Chinese-CLIP's checkpoint formats.

    python convert_checkpoint.py from-cn-clip --checkpoint epoch_latest.pt --output DIR [--vocab_file V]
    python convert_checkpoint.py to-cn-clip --model DIR --output epoch_latest.pt
    python convert_checkpoint.py from-chinese-clip --model CHINESE_CLIP_DIR --output DIR
    python convert_checkpoint.py to-chinese-clip --model DIR --output CHINESE_CLIP_DIR

from-cn-clip reads a training checkpoint of OFA-Sys Chinese-CLIP (cn_clip; ViT image towers of any
size, with or without the "module." prefix, FlashAttention-trained or not) and writes a model
directory with its processor (cn_clip's tokenizer and its square resize without crop), which
every toolkit command loads. to-cn-clip writes a checkpoint that cn_clip's load_from_name loads,
and prints how. The *-chinese-clip commands convert to and from transformers' ChineseCLIPModel.
In every direction the converted model gives the same logits as the original.
"""

import argparse
from pathlib import Path

from component.formats.cn_clip import TEXT_HEAD_WIDTH
from component.formats.cn_clip_convert import from_chinese_clip, from_cn_clip, to_chinese_clip_dir, to_cn_clip
from datatools.errors import report_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one subcommand per direction."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from_cn = commands.add_parser("from-cn-clip", help="a cn_clip training checkpoint -> a model directory")
    from_cn.add_argument("--checkpoint", required=True, type=Path, help="the cn_clip .pt file")
    from_cn.add_argument(
        "--vocab_file",
        type=Path,
        help="the text tower's vocab.txt (default: the one the installed cn_clip package ships)",
    )
    from_cn.add_argument(
        "--vision_head_width",
        type=int,
        help="width of one image attention head (default: as cn_clip's configs, 80 for width 1280, else 64)",
    )
    from_cn.add_argument(
        "--text_head_width",
        type=int,
        default=TEXT_HEAD_WIDTH,
        help="width of one text attention head (default: %(default)s, as all cn_clip text configs)",
    )
    to_cn = commands.add_parser("to-cn-clip", help="a model directory -> a cn_clip checkpoint")
    from_chinese = commands.add_parser(
        "from-chinese-clip", help="a ChineseCLIP directory -> a model directory"
    )
    to_chinese = commands.add_parser("to-chinese-clip", help="a model directory -> a ChineseCLIP directory")
    for command in (to_cn, from_chinese, to_chinese):
        command.add_argument("--model", required=True, type=Path, help="the model directory to convert")
    for command in (from_cn, from_chinese, to_chinese):
        command.add_argument("--output", required=True, type=Path, help="the directory to write")
    to_cn.add_argument(
        "--output",
        required=True,
        type=Path,
        help="the .pt file to write; model config JSONs cn_clip lacks are written beside it",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Convert in the direction the subcommand names, then say what was written."""
    if args.command == "from-cn-clip":
        from_cn_clip(
            args.checkpoint, args.output, args.vocab_file, args.vision_head_width, args.text_head_width
        )
    elif args.command == "to-cn-clip":
        export = to_cn_clip(args.model, args.output)
        print(f"wrote {export.checkpoint}; {export.usage()}")
        return
    elif args.command == "from-chinese-clip":
        from_chinese_clip(args.model, args.output)
    else:
        to_chinese_clip_dir(args.model, args.output)
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run; a bad input ends with "error: ..." and exit status 2."""
    args = parse_args(argv)
    report_user_errors(lambda: run(args))


if __name__ == "__main__":
    main()
