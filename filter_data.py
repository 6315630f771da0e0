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

from datatools.image_check import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    AtomicCsvWriter,
    InputError,
    check_rows,
    count_csv_rows,
    iter_csv_rows,
    read_csv_header,
)

REQUIRED_COLUMNS = ("text", "filename")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CSV with columns text and filename")
    parser.add_argument("--image_path", required=True, help="directory the CSV filenames are relative to")
    parser.add_argument("--output", required=True, help="CSV of the rows kept")
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
        "--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are decompression bombs"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot work, and an output (or its rejected rows) that would overwrite the input."""
    if not math.isfinite(args.max_aspect_ratio):  # NaN compares false: it would switch the check off
        raise ValueError(f"--max_aspect_ratio must be a finite number, got {args.max_aspect_ratio}")
    for name in ("workers", "min_side", "max_aspect_ratio", "max_pixels"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
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


def main(argv: list[str] | None = None) -> int:
    """Filter the CSV; exit 0 when done, 2 on bad input, 130 when interrupted (nothing written)."""
    args = parse_args(argv)
    # 1. Check the input before any work.
    try:
        check_args(args)
        fieldnames = read_csv_header(args.input, REQUIRED_COLUMNS)
        total = count_csv_rows(args.input)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # 2. Decode every image in worker processes; write both CSVs to temp files as rows come back.
    reasons: Counter[str] = Counter()
    kept = 0
    rows = iter_csv_rows(args.input)
    rejected_columns = [name for name in fieldnames if name != "reason"] + ["reason"]
    limits = {
        "min_side": args.min_side,
        "max_aspect_ratio": args.max_aspect_ratio,
        "max_pixels": args.max_pixels,
    }
    with (
        AtomicCsvWriter(args.output, fieldnames) as kept_rows,
        AtomicCsvWriter(rejected_path(args.output), rejected_columns) as rejected_rows,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused as a reason instead
        checked = check_rows(rows, args.image_path, args.workers, **limits)
        try:
            for row, reason in tqdm(checked, total=total, unit="row", desc="filter", dynamic_ncols=True):
                if reason is None:
                    kept += 1
                    kept_rows.write(row)
                else:
                    reasons[reason] += 1
                    rejected_rows.write({**row, "reason": reason})
        except KeyboardInterrupt:
            checked.close()
            print("\ninterrupted: no output written", file=sys.stderr)
            return 130
        except BrokenProcessPool:
            print("\nerror: a worker process died (out of memory?); no output written", file=sys.stderr)
            return 1
        # 3. Move both files into place only once every row is decided.
        kept_rows.commit()
        rejected_rows.commit()
    print_summary(kept, reasons, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
