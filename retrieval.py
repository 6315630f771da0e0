"""Index an image collection with a BertCLIP model, then search it by Chinese text or by image.

    python retrieval.py index --model_name_or_path DIR --images_dir photos --output photos_index
    python retrieval.py index --model_name_or_path DIR --input test.csv --image_path images --output idx
    python retrieval.py index --model_name_or_path DIR --input "shards/{00000..00009}.tar" --output idx
    python retrieval.py index --model_name_or_path DIR --input valid_texts.jsonl --output idx
    python retrieval.py search --index photos_index --text 一只在草地上奔跑的狗 --top_k 5
    python retrieval.py search --index photos_index --image query.jpg --json
    python retrieval.py serve --index photos_index --port 8000
    python retrieval.py serve --index photos_index --host 0.0.0.0 --allowed_hosts photos.lan,192.168.1.20
    python retrieval.py serve --index photos_index --backend onnx --onnx_dir photos_onnx

`index` encodes every image once and stores the embeddings, a metadata table and a faiss index;
run it again on a grown folder and only the new images are encoded. Data that holds its images
(webdataset shards, Chinese-CLIP's tsv/jsonl or LMDB) has each image written once into the
index directory's images/ folder, which the index then searches and serves as a folder.
`search` and `serve` load the model recorded in the index and rank the indexed images by cosine
similarity to the query.
`serve` runs the search page and a JSON API (FastAPI on uvicorn; reference at /docs), its queries
encoded by the PyTorch model or, with --backend onnx, by ONNX Runtime from an export_onnx.py
directory of the same model.
"""

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from component.cli import pick_device, positive_int
from component.errors import InputError
from component.retrieval.data_images import IMAGES_FOLDER, images_in_data
from component.retrieval.images import ImageSource, images_in_csv, images_in_directory
from component.retrieval.index import RetrievalIndex, SearchResult, results_document
from component.retrieval.query_encoders import BACKENDS
from component.retrieval.store import EMBEDDING_DTYPES
from component.retrieval.vectors import INDEX_TYPES
from datatools.data_kind import data_kind
from datatools.errors import report_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one sub-command of index, search and serve."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="encode a folder or CSV of images into an index directory")
    index.add_argument("--model_name_or_path", required=True, help="a BertCLIP or ChineseCLIP checkpoint")
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images_dir", type=Path, help="index every image file under this directory")
    source.add_argument(
        "--input",
        type=Path,
        help="any data training reads: a CSV with columns filename and text (with --image_path), "
        "webdataset shards (a .tar, brace pattern, glob or directory), a Chinese-CLIP *_texts.jsonl "
        "(its *_imgs.tsv beside it) or LMDB directory",
    )
    index.add_argument(
        "--image_path", type=Path, help="with a CSV --input: the directory its filenames are relative to"
    )
    index.add_argument("--output", type=Path, required=True, help="the index directory (created or updated)")
    index.add_argument("--batch_size", type=positive_int, default=64, help="images encoded at once")
    index.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available (bf16)")
    index.add_argument(
        "--index_type",
        choices=INDEX_TYPES,
        default="auto",
        help="exact (flat inner product), approximate (IVF) or auto: exact up to 2M vectors",
    )
    index.add_argument("--dtype", choices=EMBEDDING_DTYPES, help="stored embeddings; default float16")

    search = commands.add_parser("search", help="the indexed images most similar to a text or an image")
    search.add_argument("--index", type=Path, required=True, help="an index directory made by `index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a query text")
    query.add_argument("--image", type=Path, help="a query image file")
    search.add_argument("--top_k", type=positive_int, default=10, help="results to print")
    search.add_argument("--json", action="store_true", help='print {"query": ..., "results": [...]}')

    page = commands.add_parser("serve", help="a search page in the browser and a JSON API")
    page.add_argument("--index", type=Path, required=True, help="an index directory made by `index`")
    page.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: this machine only)"
    )
    page.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free port)")
    page.add_argument(
        "--allowed_hosts",
        default="",
        help="comma-separated host names (or addresses) the page may be opened by, besides localhost, "
        "127.0.0.1, [::1] and --host; other Host headers are refused (403), which stops DNS rebinding; "
        '"*" answers any name (only behind a proxy that checks the Host header)',
    )
    page.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="what encodes queries: the PyTorch model, or ONNX Runtime (needs --onnx_dir)",
    )
    page.add_argument(
        "--onnx_dir", type=Path, help="with --backend onnx: export_onnx.py's output for the index's model"
    )
    for command in (search, page):
        command.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
        command.add_argument(
            "--model_name_or_path",
            help="the index's model, if it moved (default: the path recorded in the index)",
        )
    return parser.parse_args(argv)


def index_source(args: argparse.Namespace) -> ImageSource | Callable[[], ImageSource]:
    """The images `index` reads: a folder, a CSV's files, or (made under the index's lock) the
    images a data source holds, written into the index directory."""
    if args.images_dir is not None:
        if args.image_path is not None:
            raise InputError(
                "--image_path goes with a CSV --input; --images_dir is itself the image directory"
            )
        return images_in_directory(args.images_dir)
    if data_kind(args.input) != "csv":
        if args.image_path is not None:
            raise InputError(f"{args.input} holds its images; --image_path goes only with a CSV --input")
        return partial(images_in_data, str(args.input), args.output / IMAGES_FOLDER)
    if args.image_path is None:
        raise InputError("a CSV --input needs --image_path, the directory its filenames are relative to")
    return images_in_csv(args.input, args.image_path)


def run_index(args: argparse.Namespace) -> None:
    """Build or update the index and report what was encoded, kept, removed and skipped."""
    source = index_source(args)
    index = RetrievalIndex.build(
        args.model_name_or_path,
        args.output,
        source,
        batch_size=args.batch_size,
        device=pick_device(args.device),
        index_type=args.index_type,
        dtype=args.dtype,
        progress=True,
    )
    run = index.info.last_run
    for image in run["unreadable"]:
        print(f"skipped unreadable image {image['filename']}: {image['error']}", file=sys.stderr)
    print(
        f"indexed {run['new']} new image(s); {run['already_indexed']} already indexed, "
        f"{run['removed']} removed, {len(run['unreadable'])} unreadable; {len(index)} in {args.output} "
        f"({index.info.index_type} index, {index.info.dtype})"
    )


def format_results(results: list[SearchResult]) -> str:
    """One line per result, best first: rank, cosine score, filename and text."""
    lines = []
    for rank, result in enumerate(results, start=1):
        text = f"  {result.text}" if result.text is not None else ""
        lines.append(f"{rank:3d}. {result.score:+.4f}  {result.filename}{text}")
    return "\n".join(lines)


def run_search(args: argparse.Namespace) -> None:
    """Search the index with the text or image given and print the ranked results."""
    index = RetrievalIndex.load(args.index, args.model_name_or_path, pick_device(args.device))
    if args.text is not None:
        query, results = args.text, index.search_text(args.text, args.top_k)
    else:
        if not args.image.is_file():
            raise InputError(f"{args.image}: no such image file")
        query, results = str(args.image), index.search_image(args.image, args.top_k)
    if args.json:
        print(json.dumps(results_document(query, results), ensure_ascii=False))
    else:
        print(format_results(results))


def run_serve(args: argparse.Namespace) -> None:
    """Load the index and its query encoder, then serve the page and the API until interrupted."""
    if args.backend == "onnx" and args.device == "cuda":
        raise InputError("--backend onnx runs on the CPU; leave out --device cuda")
    device = pick_device("cpu" if args.backend == "onnx" else args.device)
    index = RetrievalIndex.load(args.index, args.model_name_or_path, device, memory_map=False)
    try:
        from component.retrieval.server import serve  # the optional [serve] packages
    except ModuleNotFoundError as error:
        raise InputError(f"serve needs FastAPI and uvicorn ({error}): pip install '.[serve]'") from error
    serve(index, args.host, args.port, args.allowed_hosts, args.backend, args.onnx_dir)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run it; a bad input ends with "error: ..." and exit status 2."""
    args = parse_args(argv)
    commands = {"index": run_index, "search": run_search, "serve": run_serve}
    report_user_errors(lambda: commands[args.command](args))


if __name__ == "__main__":
    main()
