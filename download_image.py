"""Download the images of a `text,url,filename` CSV as small RGB JPEGs, resumably.

    python download_image.py --input data/train.csv --output data/images [--threads N]

Re-running skips images already stored; `--retry_failed` retries only the rows of the last
failure list. Writes `<output>/download_report.json` and `<output>/download_failed.csv` (UTF-8).
"""

import argparse
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

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

REQUIRED_COLUMNS = ("url", "filename")
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
    table = CsvTable.open(args.input, REQUIRED_COLUMNS, args.encoding)
    total = table.count()  # reads the whole file: a malformed CSV fails here, naming the line
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{output}: cannot create the output directory ({error})") from None
    retry_names = read_failed_filenames(output) if args.retry_failed else None
    return options, table, total, retry_names


def download_with_progress(
    rows: Iterable[dict[str, str]],
    output: Path,
    downloader: ImageDownloader,
    threads: int,
    report: DownloadReport,
    total: int,
) -> bool:
    """`download_rows` with a progress bar, every finished row counted into `report`; True if interrupted."""
    with tqdm(total=total, unit="img", desc="download", dynamic_ncols=True) as bar:

        def record(row: dict[str, str], outcome: str) -> None:
            report.record(row, outcome)
            bar.update()
            if bar.n % 100 == 0 or bar.n == total:  # formatting the postfix per row would cost more
                bar.set_postfix(ok=report.counts["ok"], failed=report.counts["failed"], refresh=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused as a reason instead
            return download_rows(plan_downloads(rows, output), downloader, threads, record)


def main(argv: list[str] | None = None) -> int:
    """Download every row's image; exit 0 when the run completed, even with failed rows."""
    args = parse_args(argv)
    output = Path(args.output)
    # 1. Check the input and the options before any work.
    try:
        options, table, total, retry_names = check_input(args, output)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if table.encoding_note():
        print(table.encoding_note(), file=sys.stderr)
    # 2. Stream the rows: all of them, or only those of the last failure list.
    rows = table.rows()
    if retry_names is not None:
        rows = (row for row in rows if row.get("filename", "") in retry_names)
        total = len(retry_names)
    # 3. Download; idle connections are kept within the open-file limit (raised as far as allowed).
    open_file_limit = raise_open_file_limit()
    downloader = ImageDownloader(
        options, hosts_per_thread=keepalive_hosts_per_thread(args.threads, open_file_limit)
    )
    report = None
    try:
        report = DownloadReport(output, table.fieldnames)
        interrupted = download_with_progress(rows, output, downloader, args.threads, report, total)
        # 4. Save the report; an interrupted retry keeps the old failure list, which still holds the rest.
        details = {"input": str(args.input), "output": str(output), "retry_failed": args.retry_failed}
        saved = report.save(
            {**details, "interrupted": interrupted}, keep_old_failure_list=interrupted and args.retry_failed
        )
    except (OSError, UserError) as error:  # a full disk or no file descriptors (see FATAL_ERRNOS)
        if report is not None:
            report.discard()
        if isinstance(error, UserError):  # the input changed or became unreadable during the run
            print(f"\nerror: {error}", file=sys.stderr)
            return error.exit_code
        print(f"\nerror: {fatal_error_message(error, output, open_file_limit)}", file=sys.stderr)
        return 1
    print_summary(saved, output)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
