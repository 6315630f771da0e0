"""Download the images of a `text,url,filename` CSV as small RGB JPEGs, resumably.

    python download_image.py --input data/train.csv --output data/images [--threads N]

Re-running skips images already stored; `--retry_failed` retries only the rows of the last
failure list. Writes `<output>/download_report.json` and `<output>/download_failed.csv`.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

from PIL import Image
from tqdm import tqdm

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
from datatools.fetch import OUT_OF_DESCRIPTORS, DownloadOptions, keepalive_hosts_per_thread
from datatools.image_check import InputError, count_csv_rows, iter_csv_rows, read_csv_header

REQUIRED_COLUMNS = ("url", "filename")
DEFAULTS = DownloadOptions()
# Enough requests in flight to cover ~0.3 s of web latency at what the cores can convert.
DEFAULT_THREADS = min(256, 32 * (os.cpu_count() or 2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every option has a default that works for a web-scale CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CSV with columns url and filename (and text)")
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
    """The per-image limits from the command line (a bad value raises ValueError naming it)."""
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
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


def fatal_error_message(error: OSError, output: Path, open_file_limit: int) -> str:
    """What stopped the run: no file descriptors left, or a disk that takes no more images."""
    if error.errno in OUT_OF_DESCRIPTORS:
        return (
            f"out of file descriptors ({error}) at a limit of {open_file_limit} open files: "
            "run with fewer --threads, or raise the limit (ulimit -n)"
        )
    return f"cannot write images to {output}: {error}"


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


def main(argv: list[str] | None = None) -> int:
    """Download every row's image; exit 0 when the run completed, even with failed rows."""
    args = parse_args(argv)
    output = Path(args.output)
    # 1. Check the input and the options before any work.
    try:
        options = build_options(args)
        fieldnames = read_csv_header(args.input, REQUIRED_COLUMNS)
        total = count_csv_rows(args.input)
        output.mkdir(parents=True, exist_ok=True)
        retry_names = read_failed_filenames(output) if args.retry_failed else None
    except (InputError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # 2. Stream the rows: all of them, or only those of the last failure list.
    rows = iter_csv_rows(args.input)
    if retry_names is not None:
        rows = (row for row in rows if row.get("filename", "") in retry_names)
        total = len(retry_names)
    # 3. Download, counting every finished row into the report; idle connections are kept within
    #    the open-file limit (raised as far as the system allows).
    open_file_limit = raise_open_file_limit()
    downloader = ImageDownloader(
        options, hosts_per_thread=keepalive_hosts_per_thread(args.threads, open_file_limit)
    )
    report = DownloadReport(output, fieldnames)
    with tqdm(total=total, unit="img", desc="download", dynamic_ncols=True) as bar:

        def record(row: dict[str, str], outcome: str) -> None:
            report.record(row, outcome)
            bar.update()
            if bar.n % 100 == 0 or bar.n == total:  # formatting the postfix per row would cost more
                bar.set_postfix(ok=report.counts["ok"], failed=report.counts["failed"], refresh=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused as a reason instead
            try:
                interrupted = download_rows(plan_downloads(rows, output), downloader, args.threads, record)
            except OSError as error:  # no later row can succeed (see FATAL_ERRNOS)
                report.discard()
                print(f"\nerror: {fatal_error_message(error, output, open_file_limit)}", file=sys.stderr)
                return 1
    # 4. Save the report; an interrupted retry keeps the old failure list, which still holds the rest.
    details = {"input": str(args.input), "output": str(output), "retry_failed": args.retry_failed}
    saved = report.save(
        {**details, "interrupted": interrupted}, keep_old_failure_list=interrupted and args.retry_failed
    )
    print_summary(saved, output)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
