"""Keep only the CSV rows whose image decodes fully and is fit for training.

    python filter_data.py --input data/train.csv --image_path data/images --output data/train.filtered.csv

Rejected rows go to `<output stem>.rejected.csv` with a `reason` column. Images are only read,
never changed or deleted.
"""

import argparse
import math
import os
import sys
import warnings
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from datatools.csv_rows import AtomicCsvWriter, CsvTable, InputError
from datatools.errors import UserError
from datatools.image_check import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MIN_SIDE, check_rows
from datatools.images import MAX_PIXELS

REQUIRED_COLUMNS = ("text", "filename")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CSV with columns text and filename")
    parser.add_argument("--image_path", required=True, help="directory the CSV filenames are relative to")
    parser.add_argument(
        "--output", required=True, help="CSV of the rows kept (UTF-8, as is <output stem>.rejected.csv)"
    )
    parser.add_argument(
        "--encoding", default=None, help="the input's encoding (default: UTF-8, else GB18030)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)"
    )
    parser.add_argument(
        "--min_side", type=int, default=DEFAULT_MIN_SIDE, help="drop images whose shorter side is smaller"
    )
    parser.add_argument(
        "--max_aspect_ratio",
        type=float,
        default=DEFAULT_MAX_ASPECT_RATIO,
        help="drop images whose long/short side ratio is larger (0: no limit)",
    )
    parser.add_argument(
        "--max_pixels", type=int, default=MAX_PIXELS, help="larger images are decompression bombs"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot work, and an output (or its rejected rows) that would overwrite the input."""
    if not math.isfinite(args.max_aspect_ratio):  # NaN compares false: it would switch the check off
        raise InputError(f"--max_aspect_ratio must be a finite number, got {args.max_aspect_ratio}")
    for name in ("workers", "min_side", "max_aspect_ratio", "max_pixels"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not Path(args.image_path).is_dir():
        raise InputError(f"{args.image_path}: no such image directory")
    if is_same_file(args.output, args.input):
        raise InputError(f"--output {args.output} is the input file; choose another path")
    if is_same_file(rejected_path(args.output), args.input):
        raise InputError(
            f"--output {args.output} would write its rejected rows to {rejected_path(args.output)}, "
            "the input file; choose another path"
        )


def is_same_file(path: str | Path, other: str | Path) -> bool:
    """Whether two paths name one file (through symlinks or hard links); either may not exist yet."""
    path, other = Path(path), Path(other)
    if path.resolve() == other.resolve():
        return True
    return path.exists() and other.exists() and os.path.samefile(path, other)


def rejected_path(output: str | Path) -> Path:
    """`<output stem>.rejected.csv` beside the output."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejected.csv")


def print_summary(kept: int, reasons: Counter[str], output: Path) -> None:
    """Rows kept and rejected, then the reasons, most common first."""
    total = kept + sum(reasons.values())
    share = f" ({kept / total:.1%})" if total else ""
    print(f"kept {kept} of {total} rows{share}, rejected {total - kept}")
    for reason, count in reasons.most_common():
        print(f"  {reason:<24} {count}")
    print(f"kept rows: {output}; rejected rows: {rejected_path(output)}")


def filter_rows(table: CsvTable, args: argparse.Namespace, total: int) -> tuple[int, Counter[str]]:
    """Decode every row's image in worker processes and write the kept and the rejected rows.

    Both files are written to temp files as rows come back and appear only when every row is
    decided; on an error (Ctrl-C, a full disk) neither is written. Returns the rows kept and
    the count of each rejection reason.
    """
    reasons: Counter[str] = Counter()
    kept = 0
    rejected_columns = [name for name in table.fieldnames if name != "reason"] + ["reason"]
    limits = {
        "min_side": args.min_side,
        "max_aspect_ratio": args.max_aspect_ratio,
        "max_pixels": args.max_pixels,
    }
    with (
        AtomicCsvWriter(args.output, table.fieldnames) as kept_rows,
        AtomicCsvWriter(rejected_path(args.output), rejected_columns) as rejected_rows,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused as a reason instead
        checked = check_rows(table.rows(), args.image_path, args.workers, **limits)
        try:
            for row, reason in tqdm(checked, total=total, unit="row", desc="filter", dynamic_ncols=True):
                if reason is None:
                    kept += 1
                    kept_rows.write(row)
                else:
                    reasons[reason] += 1
                    rejected_rows.write({**row, "reason": reason})
        finally:
            checked.close()  # stop the worker processes now, whatever ended the loop
        # Both files written out before either moves into place: a full disk leaves neither.
        kept_rows.finish()
        rejected_rows.finish()
        kept_rows.commit()
        rejected_rows.commit()
    return kept, reasons


def main(argv: list[str] | None = None) -> int:
    """Filter the CSV; exit 0 when done, 2 on bad input, 1 when the run could not finish, 130 on
    Ctrl-C (nothing is written unless the run finished)."""
    args = parse_args(argv)
    # 1. Check the input before any work; reading every row finds a malformed CSV now.
    try:
        check_args(args)
        table = CsvTable.open(args.input, REQUIRED_COLUMNS, args.encoding)
        total = table.count()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if table.encoding_note():
        print(table.encoding_note(), file=sys.stderr)
    # 2. Decide every row, then move both CSVs into place.
    try:
        kept, reasons = filter_rows(table, args, total)
    except KeyboardInterrupt:
        print("\ninterrupted: no output written", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print("\nerror: a worker process died (out of memory?); no output written", file=sys.stderr)
        return 1
    except OSError as error:  # a full, over-quota or read-only disk
        print(f"\nerror: cannot write {args.output} ({error}); no output written", file=sys.stderr)
        return 1
    except UserError as error:  # the input changed or became unreadable during the run
        print(f"\nerror: {error}; no output written", file=sys.stderr)
        return error.exit_code
    print_summary(kept, reasons, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
