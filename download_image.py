"""Download the images of a `text,url,filename` CSV as small RGB JPEGs, resumably.

    python download_image.py --input data/train.csv --output data/images [--threads N]
    python download_image.py --input data/train.csv --output data/shards --output_format webdataset

Files (the default): re-running skips images already stored; `--retry_failed` retries only the
rows of the last failure list. Writes `<output>/download_report.json` and
`<output>/download_failed.csv` (UTF-8). Webdataset: img2dataset-compatible tar shards of
`--shard_size` rows, each with `_stats.json` and `_failed.csv`, and `sizes.json`; re-running
skips finished shards, and `--part K/N` takes every N-th shard (see docs/data_tools.md).
"""

import argparse
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from datatools.csv_rows import CsvTable, InputError
from datatools.download import (
    FAILED_NAME,
    REPORT_NAME,
    DownloadReport,
    ImageDownloader,
    download_rows,
    plan_downloads,
    raise_open_file_limit,
    read_failed_filenames,
)
from datatools.errors import UserError
from datatools.fetch import OUT_OF_DESCRIPTORS, DownloadOptions, keepalive_hosts_per_thread
from datatools.shard_writer import DEFAULT_SHARD_SIZE, Part, ShardedOutput, ShardLayout
from datatools.shards import SIZES_FILE

REQUIRED_COLUMNS = ("url", "filename")
SHARD_REQUIRED_COLUMNS = ("url",)  # shards are named by row number, not by a filename column
DEFAULTS = DownloadOptions()
# Enough requests in flight to cover ~0.3 s of web latency at what the cores can convert.
DEFAULT_THREADS = min(256, 32 * (os.cpu_count() or 2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every option has a default that works for a web-scale CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CSV with columns url and filename (and text)")
    parser.add_argument(
        "--encoding",
        default=None,
        help="the input's encoding (default: UTF-8, else GB18030); the failure list is written in UTF-8",
    )
    parser.add_argument("--output", required=True, help="directory the images are stored in")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"parallel downloads (default {DEFAULT_THREADS})"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULTS.timeout, help="name lookup/connect/read timeout, seconds"
    )
    parser.add_argument(
        "--deadline", type=float, default=DEFAULTS.deadline, help="total seconds per image, retries included"
    )
    parser.add_argument(
        "--retries", type=int, default=DEFAULTS.retries, help="extra attempts after transient errors"
    )
    parser.add_argument("--backoff", type=float, default=DEFAULTS.backoff, help="first retry wait, seconds")
    parser.add_argument(
        "--max_bytes", type=int, default=DEFAULTS.max_bytes, help="largest body accepted, bytes"
    )
    parser.add_argument(
        "--max_redirects", type=int, default=DEFAULTS.max_redirects, help="redirects followed"
    )
    parser.add_argument(
        "--short_side",
        type=int,
        default=DEFAULTS.short_side,
        help="shrink the shorter side to this; 0 keeps size",
    )
    parser.add_argument(
        "--max_pixels", type=int, default=DEFAULTS.max_pixels, help="larger images are decompression bombs"
    )
    parser.add_argument(
        "--retry_failed", action="store_true", help=f"retry only the rows in <output>/{FAILED_NAME}"
    )
    parser.add_argument(
        "--output_format",
        choices=("files", "webdataset"),
        default="files",
        help="files: one JPEG per row under its filename; webdataset: img2dataset-compatible tar shards",
    )
    parser.add_argument(
        "--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard (webdataset)"
    )
    parser.add_argument(
        "--part",
        default="1/1",
        help="K/N: write only the shards whose number modulo N is K-1 (webdataset; one part per machine)",
    )
    return parser.parse_args(argv)


def build_options(args: argparse.Namespace) -> DownloadOptions:
    """The per-image limits from the command line (a bad value raises InputError naming it)."""
    if args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    try:
        return DownloadOptions(
            timeout=args.timeout,
            deadline=args.deadline,
            max_bytes=args.max_bytes,
            retries=args.retries,
            backoff=args.backoff,
            max_redirects=args.max_redirects,
            short_side=args.short_side,
            max_pixels=args.max_pixels,
        )
    except ValueError as error:  # DownloadOptions names the bad value
        raise InputError(f"--{error}") from None


def fatal_error_message(error: OSError, output: Path, open_file_limit: int) -> str:
    """What stopped the run: no file descriptors left, or a disk that takes no more images."""
    if error.errno in OUT_OF_DESCRIPTORS:
        return (
            f"out of file descriptors ({error}) at a limit of {open_file_limit} open files: "
            "run with fewer --threads, or raise the limit (ulimit -n)"
        )
    return f"cannot write to {output}: {error}"


def print_summary(report: dict, output: Path) -> None:
    """One line of totals, then the failure reasons, most common first."""
    state = "interrupted after" if report["interrupted"] else "finished"
    print(
        f"{state} {report['total']} rows: {report['ok']} downloaded, {report['skipped']} already there, "
        f"{report['failed']} failed ({report['ok_per_s']} images/s)"
    )
    for reason, count in report["failure_reasons"].items():
        print(f"  {reason:<24} {count}")
    print(f"report: {output / REPORT_NAME}; failed rows: {output / FAILED_NAME}")


def check_input(
    args: argparse.Namespace, output: Path
) -> tuple[DownloadOptions, CsvTable, int, set[str] | None]:
    """The options, the input table, its row count and the filenames to retry, all checked before
    any work; raises a `UserError` naming what to fix."""
    options = build_options(args)
    shards = args.output_format == "webdataset"
    if shards:
        Part.parse(args.part)
        ShardLayout(args.shard_size, 0)
    if shards and args.retry_failed:
        raise InputError("--retry_failed works with --output_format files; a re-run redoes unfinished shards")
    table = CsvTable.open(args.input, SHARD_REQUIRED_COLUMNS if shards else REQUIRED_COLUMNS, args.encoding)
    total = table.count()  # reads the whole file: a malformed CSV fails here, naming the line
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{output}: cannot create the output directory ({error})") from None
    retry_names = read_failed_filenames(output) if args.retry_failed else None
    return options, table, total, retry_names


def download_with_progress(
    tasks: Iterable[tuple],
    downloader: ImageDownloader,
    threads: int,
    record: Callable[[Any, Any], None],
    counts: Counter,
    total: int,
    work: Callable[[str, Any], Any] | None = None,
) -> bool:
    """`download_rows` with a progress bar showing `counts` (`ok`, `failed`); True if interrupted."""
    with tqdm(total=total, unit="img", desc="download", dynamic_ncols=True) as bar:

        def record_and_show(row: Any, outcome: Any) -> None:
            record(row, outcome)
            bar.update()
            if bar.n % 100 == 0 or bar.n == total:  # formatting the postfix per row would cost more
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused as a reason instead
            return download_rows(tasks, downloader, threads, record_and_show, work)


def start_downloader(options: DownloadOptions, threads: int) -> tuple[ImageDownloader, int]:
    """The downloader, its idle connections kept within the open-file limit (raised as far as
    allowed); and that limit."""
    open_file_limit = raise_open_file_limit()
    hosts = keepalive_hosts_per_thread(threads, open_file_limit)
    return ImageDownloader(options, hosts_per_thread=hosts), open_file_limit


def report_stop(error: OSError | UserError, output: Path, open_file_limit: int) -> int:
    """Print why the run stopped in one line; its exit code."""
    if isinstance(error, UserError):  # the input changed or became unreadable during the run
        print(f"\nerror: {error}", file=sys.stderr)
        return error.exit_code
    print(f"\nerror: {fatal_error_message(error, output, open_file_limit)}", file=sys.stderr)
    return 1


def download_files(
    args: argparse.Namespace,
    options: DownloadOptions,
    table: CsvTable,
    total: int,
    retry_names: set[str] | None,
) -> int:
    """Store each row's image under its filename, then write the report and the failure list."""
    output = Path(args.output)
    # Stream the rows: all of them, or only those of the last failure list.
    rows = table.rows()
    if retry_names is not None:
        rows = (row for row in rows if row.get("filename", "") in retry_names)
        total = len(retry_names)
    downloader, open_file_limit = start_downloader(options, args.threads)
    report = None
    try:
        report = DownloadReport(output, table.fieldnames)
        tasks = plan_downloads(rows, output)
        interrupted = download_with_progress(
            tasks, downloader, args.threads, report.record, report.counts, total
        )
        # An interrupted retry keeps the old failure list, which still holds the rest.
        details = {"input": str(args.input), "output": str(output), "retry_failed": args.retry_failed}
        saved = report.save(
            {**details, "interrupted": interrupted}, keep_old_failure_list=interrupted and args.retry_failed
        )
    except (OSError, UserError) as error:  # a full disk or no file descriptors (see FATAL_ERRNOS)
        if report is not None:
            report.discard()
        return report_stop(error, output, open_file_limit)
    print_summary(saved, output)
    return 130 if interrupted else 0


def download_shards(args: argparse.Namespace, options: DownloadOptions, table: CsvTable, total: int) -> int:
    """Write this part's unfinished shards, each in row order and atomically, then `sizes.json`."""
    output = Path(args.output)
    layout = ShardLayout(args.shard_size, total)
    sharded = ShardedOutput(output, layout, Part.parse(args.part), table.fieldnames)
    downloader, open_file_limit = start_downloader(options, args.threads)
    started = time.monotonic()
    try:
        tasks, record = sharded.tasks(table.rows()), sharded.record
        interrupted = download_with_progress(
            tasks, downloader, args.threads, record, sharded.counts, sharded.rows_to_do, downloader.convert
        )
        if interrupted:  # the shards being written are incomplete: they go, finished ones stay
            sharded.discard()
        else:
            sharded.finish()
    except (OSError, UserError) as error:
        sharded.discard()
        return report_stop(error, output, open_file_limit)
    counts, seconds = sharded.counts, time.monotonic() - started
    state = "interrupted after" if interrupted else "finished"
    print(
        f"{state} {counts['shards_written']} shards ({counts['shards_already_there']} already there): "
        f"{counts['ok']} downloaded, {counts['failed']} failed, {counts['skipped']} rows in finished shards "
        f"({counts['ok'] / max(seconds, 1e-9):.1f} images/s)"
    )
    for reason, count in sharded.reasons.most_common():
        print(f"  {reason:<24} {count}")
    print(f"shards, *_stats.json and *_failed.csv in {output}; sample counts: {output / SIZES_FILE}")
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """Download every row's image; exit 0 when the run completed, even with failed rows."""
    args = parse_args(argv)
    # 1. Check the input and the options before any work.
    try:
        options, table, total, retry_names = check_input(args, Path(args.output))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if table.encoding_note():
        print(table.encoding_note(), file=sys.stderr)
    # 2. Download into the chosen layout, and write what was done.
    if args.output_format == "webdataset":
        return download_shards(args, options, table, total)
    return download_files(args, options, table, total, retry_names)


if __name__ == "__main__":
    sys.exit(main())
