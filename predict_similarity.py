"""Score images against texts, texts against texts and images against images; zero-shot labels.

    python predict_similarity.py --model_name_or_path DIR --images cat.jpg --texts 一只猫 一只狗
    python predict_similarity.py --model_name_or_path DIR --images_dir photos --labels 猫 狗 鸟 --top_k 1
    python predict_similarity.py --model_name_or_path DIR --texts_file sentences.txt --json

For each query the candidates are ranked by cosine similarity, with a probability that follows the
loss the model was trained with. A CLIP model (softmax loss): the softmax over the candidates of
cosine * exp(logit_scale), the model's own logits, so each query's probabilities sum to 1. A SigLIP
model (sigmoid loss, it has a logit bias): the match probability of each pair on its own,
sigmoid(cosine * exp(logit_scale) + logit_bias). The JSON says which ("probability"). In text-text
and image-image mode every input is scored against every other, and a self-match gets probability 0.

Output cut short by the reader (`... | head`) ends the script quietly with exit status 141, as
for any Unix tool killed by SIGPIPE (128 + 13), so `set -o pipefail` scripts see what they expect.
"""

import argparse
import json
from pathlib import Path

from component.cli import list_images, model_script_parser, pick_device, positive_int, run_printing_script
from component.encoding import (
    MODES,
    ZERO_SHOT_TEMPLATES,
    InputError,
    Mode,
    Scores,
    check_templates,
    class_embeddings,
    encode_images,
    encode_texts,
    load_model_and_processor,
    logit_bias_of,
    score_embeddings,
    scores_document,
    top_candidates,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = model_script_parser(__doc__)
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="image-text: images are the queries, texts the candidates; text-text and image-image: every "
        "input against every other. Default: image-text when images and texts (or --labels) are given, "
        "otherwise whichever kind of input there is",
    )
    parser.add_argument("--texts", nargs="+", default=[], metavar="T", help="texts to score")
    parser.add_argument("--texts_file", type=Path, help="a UTF-8 file of texts, one per line")
    parser.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files to score")
    parser.add_argument("--images_dir", type=Path, help="score every image file under this directory")
    parser.add_argument(
        "--labels",
        nargs="+",
        default=[],
        metavar="L",
        help="zero-shot classification: rank these class names for each image, using prompt templates",
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        default=list(ZERO_SHOT_TEMPLATES),
        metavar="TEMPLATE",
        help="prompt templates for --labels, each with '{}' for the class name; other braces are "
        "literal text (default: %(default)s)",
    )
    parser.add_argument("--top_k", type=positive_int, default=5, help="candidates printed per query")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document with the full cosine and probability matrices",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="inputs encoded at once")
    parser.add_argument("--max_length", type=positive_int, default=64, help="tokens per text, at most")
    return parser.parse_args(argv)


def read_texts_file(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the texts file ({error})") from error
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise InputError(f"{path}: no texts (the file has no non-blank lines)")
    return texts


def gather_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """All texts and image paths from the command line, files and directories included."""
    texts = list(args.texts) + (read_texts_file(args.texts_file) if args.texts_file else [])
    images = list(args.images) + [
        str(path) for path in (list_images(args.images_dir) if args.images_dir else [])
    ]
    for image in args.images:
        if not Path(image).is_file():
            raise InputError(f"{image}: no such image file")
    return texts, images


def choose_mode(requested: Mode | None, texts: list[str], images: list[str], labels: list[str]) -> Mode:
    """The mode asked for, or the one the inputs imply; refuse a mode without the inputs it needs."""
    if labels and texts:
        raise InputError(
            "--labels are the candidates for zero-shot classification; give --labels or texts, not both"
        )
    if labels and requested not in (None, "image-text"):
        raise InputError(f"--labels classify images, so they need image-text mode, not {requested}")
    if not (texts or images or labels):
        raise InputError("nothing to score: give --texts/--texts_file and/or --images/--images_dir")
    if requested is None:
        if images and (texts or labels):
            requested = "image-text"
        else:
            requested = "text-text" if texts or labels else "image-image"
    if requested == "image-text" and not (images and (texts or labels)):
        raise InputError("image-text mode needs images (--images/--images_dir) and texts (or --labels)")
    if requested == "text-text" and (images or len(texts) < 2):
        raise InputError("text-text mode needs at least 2 texts and no images")
    if requested == "image-image" and (texts or len(images) < 2):
        raise InputError("image-image mode needs at least 2 images and no texts")
    return requested


def score(
    model, processor, args: argparse.Namespace, mode: Mode, texts: list[str], images: list[str]
) -> Scores:
    """Encode the inputs of `mode` and score queries against candidates."""
    options = dict(batch_size=args.batch_size)
    text_options = dict(options, max_length=args.max_length)
    templates = list(args.templates) if args.labels else None
    if mode == "image-text":
        query_embeds = encode_images(model, processor, images, progress=bool(args.images_dir), **options)
        if args.labels:
            candidate_embeds = class_embeddings(model, processor, args.labels, templates, **text_options)
        else:
            candidate_embeds = encode_texts(
                model, processor, texts, progress=bool(args.texts_file), **text_options
            )
        queries, candidates = images, list(args.labels) or texts
    elif mode == "text-text":
        query_embeds = encode_texts(model, processor, texts, progress=bool(args.texts_file), **text_options)
        candidate_embeds, queries, candidates = query_embeds, texts, texts
    else:
        query_embeds = encode_images(model, processor, images, progress=bool(args.images_dir), **options)
        candidate_embeds, queries, candidates = query_embeds, images, images
    logit_scale = model.logit_scale.detach().cpu()
    return score_embeddings(
        mode,
        queries,
        candidates,
        query_embeds,
        candidate_embeds,
        logit_scale,
        logit_bias_of(model),
        templates,
    )


def format_rankings(scores: Scores, top_k: int) -> str:
    """Per query, its `top_k` best candidates with probability and cosine, best first."""
    lines = []
    for query_index, candidate_indices in enumerate(
        top_candidates(scores.cosine, top_k, scores.exclude_self)
    ):
        lines.append(scores.queries[query_index])
        for rank, candidate_index in enumerate(candidate_indices.tolist(), start=1):
            prob = scores.probs[query_index, candidate_index].item()
            cosine = scores.cosine[query_index, candidate_index].item()
            lines.append(
                f"  {rank}. prob {prob:.4f}  cosine {cosine:+.4f}  {scores.candidates[candidate_index]}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Check the inputs, load the model, score and print."""
    texts, images = gather_inputs(args)
    mode = choose_mode(args.mode, texts, images, args.labels)
    if args.labels:
        check_templates(args.templates)
    device = pick_device(args.device)
    model, processor = load_model_and_processor(args.model_name_or_path, device)
    scores = score(model, processor, args, mode, texts, images)
    if args.json:
        print(json.dumps(scores_document(scores, args.top_k), ensure_ascii=False))
    else:
        print(format_rankings(scores, args.top_k))


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run; a bad input ends with "error: ..." and exit status 2.

    A reader that stops early (`| head`) ends the run quietly with exit status 141 (SIGPIPE's).
    """
    args = parse_args(argv)
    run_printing_script(lambda: run(args))


if __name__ == "__main__":
    main()
