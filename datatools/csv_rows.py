"""CSV tables: the one strict reader every tool uses, and an atomic writer.

`CsvTable.open` checks a file before any work: it exists, its encoding decodes the whole file
(UTF-8 with or without a BOM, else GB18030, as Excel saves CSV on Chinese Windows), and its
header has the required columns (compared ignoring case and surrounding spaces). Reading is
strict: a stray quote, a row with more values than the header, or a quoted value that runs on
over many lines refuses the whole file with the line the bad record starts on, instead of
silently merging the rows that follow into one value. Rows stream, so memory stays flat.
"""

import codecs
import csv
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from datatools.errors import UserError

# Column names the toolkit reads; spelt in any case, with spaces around, they are normalized.
KNOWN_COLUMNS = ("text", "url", "filename")
# Tried in this order when no encoding is named. GB18030 is a superset of GBK and GB2312.
GUESSED_ENCODINGS = ("utf-8-sig", "gb18030")
# A record may span this many lines (a caption with line breaks, quoted); more is taken for a
# quote that was never closed, which swallows the rows after it.
MAX_RECORD_LINES = 20
_CHUNK_BYTES = 1 << 20
_MALFORMED_HINT = (
    "a stray or unclosed quote? A value that holds a comma, a quote or a line break must be quoted, "
    "its quotes doubled"
)


class InputError(UserError):
    """Input the user must fix (a missing file or column, a malformed CSV); the message says which."""


def undecodable_line(path: str | Path, encoding: str) -> str | None:
    """Where `encoding` first fails to decode the file ("line N: ..."), or None when all of it decodes.

    One pass in binary: for a UTF-8 file of 1 GB about a second, far less than parsing it.
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                # error.object is the decoder's few held-back bytes plus this chunk; the held-back
                # bytes are part of one character, never a line break.
                line += error.object.count(b"\n", 0, error.start)
                return f"line {line}: cannot decode {error.object[error.start : error.end]!r}"
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"line {line}: the file ends inside a character"
    return None


def choose_encoding(path: str | Path, encoding: str | None = None) -> str:
    """The encoding to read `path` with: `encoding` if named (checked), else UTF-8, else GB18030."""
    if encoding is not None:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise InputError(f"unknown encoding {encoding!r} (try utf-8 or gb18030)") from None
        name = "utf-8-sig" if name == "utf-8" else name  # a BOM is not part of the first column's name
        failure = undecodable_line(path, name)
        if failure:
            raise InputError(f"{path}: not valid {encoding} at {failure}; is the encoding right?")
        return name
    failures = []
    for name in GUESSED_ENCODINGS:
        failure = undecodable_line(path, name)
        if failure is None:
            return name
        failures.append(f"{name.removesuffix('-sig')} fails at {failure}")
    raise InputError(
        f"{path}: neither UTF-8 nor GB18030 ({'; '.join(failures)}); "
        "name its encoding (--encoding, or csv_encoding for training) or save it as CSV UTF-8"
    )


def normalized_header(path: Path, header: list[str], required: Sequence[str]) -> list[str]:
    """`header` with the known and required names spelt as the toolkit does (`Text ` becomes `text`),
    the other names as they are, so outputs that pass rows through keep them."""
    canonical = {name.strip().lower(): name for name in (*KNOWN_COLUMNS, *required)}
    names = [canonical.get(name.strip().lower(), name) for name in header]
    duplicated = sorted({name for name in canonical.values() if names.count(name) > 1})
    if duplicated:
        raise InputError(f"{path}: more than one column is named {', '.join(duplicated)}; found {header}")
    missing = [name for name in required if name not in names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {header}")
    return names


@dataclass(frozen=True)
class CsvTable:
    """A checked CSV file: its path, the encoding it is read with, and its column names."""

    path: Path
    encoding: str
    fieldnames: list[str]
    encoding_named: bool = False

    @classmethod
    def open(cls, path: str | Path, required: Sequence[str], encoding: str | None = None) -> "CsvTable":
        """Check that `path` is a readable CSV whose header has the `required` columns.

        encoding: read with this one; None tries UTF-8 (with or without a BOM), then GB18030.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            chosen = choose_encoding(path, encoding)
            with open(path, newline="", encoding=chosen) as file:
                header = next(csv.reader(file, strict=True), None)
        except OSError as error:
            raise InputError(f"{path}: cannot read it ({error})") from None
        except csv.Error as error:
            raise InputError(f"{path}: malformed CSV header on line 1 ({error})") from None
        if not header:
            raise InputError(f"{path}: empty file, expected a header with columns {', '.join(required)}")
        return cls(path, chosen, normalized_header(path, header, required), encoding is not None)

    def encoding_note(self) -> str | None:
        """One line saying which encoding was guessed, when it is not UTF-8; None otherwise."""
        if self.encoding_named or self.encoding == "utf-8-sig":
            return None
        return f"{self.path}: not UTF-8, read as {self.encoding.upper()} (name it with the encoding option)"

    def records(self) -> Iterator[list[str]]:
        """Each data row's values, as many as there are columns (short rows padded with "").

        Raises `InputError` naming the line a malformed record starts on; blank lines are skipped.
        """
        width = len(self.fieldnames)
        try:
            with open(self.path, newline="", encoding=self.encoding) as file:
                reader = csv.reader(file, strict=True)
                next(reader, None)  # the header, checked by `open`
                start = reader.line_num + 1
                try:
                    for values in reader:
                        lines = reader.line_num - start + 1
                        if values and (len(values) != width or lines > 1):
                            self._check_record(values, start, lines)
                            values += [""] * (width - len(values))
                        if values:
                            yield values
                        start = reader.line_num + 1
                except csv.Error as error:
                    raise InputError(
                        f"{self.path}: malformed CSV in the row starting on line {start} "
                        f"({error}; {_MALFORMED_HINT})"
                    ) from None
        except UnicodeDecodeError:  # the file changed since `open` checked it
            failure = undecodable_line(self.path, self.encoding)
            raise InputError(f"{self.path}: not valid {self.encoding} at {failure}") from None
        except OSError as error:
            raise InputError(f"{self.path}: cannot read it ({error})") from None

    def _check_record(self, values: list[str], start: int, lines: int) -> None:
        """Refuse a record with more values than columns, or one that spans lines oddly."""
        width = len(self.fieldnames)
        if len(values) > width:
            raise InputError(
                f"{self.path}: line {start} has {len(values)} values, the header {width} "
                "(an unquoted comma? quote a value that holds one)"
            )
        if lines > MAX_RECORD_LINES or (lines > 1 and len(values) < width):
            raise InputError(
                f"{self.path}: malformed CSV: a quoted value opened on line {start} runs over {lines} lines "
                f"and takes the rows after it ({_MALFORMED_HINT})"
            )

    def rows(self) -> Iterator[dict[str, str]]:
        """Each data row as a dict keyed by the (normalized) column names."""
        for values in self.records():
            yield dict(zip(self.fieldnames, values, strict=True))

    def columns(self, *names: str) -> Iterator[tuple[str, ...]]:
        """Each data row's values of the columns `names` only (no dict per row)."""
        indexes = [self.fieldnames.index(name) for name in names]
        for values in self.records():
            yield tuple(values[index] for index in indexes)

    def count(self) -> int:
        """The number of data rows; reads the whole file, so a malformed CSV fails before any work."""
        return sum(1 for _ in self.records())


class AtomicCsvWriter:
    """CSV rows, in UTF-8, written to a hidden temp file beside `path` and moved into place by `commit()`.

    Leaving the `with` block without `commit()` (an error, Ctrl-C, a full disk) removes the temp
    file, so `path` is either the old file or the complete new one.
    """

    def __init__(self, path: str | Path, fieldnames: Sequence[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = self.path.with_name(f".{uuid.uuid4().hex}.part")  # short: any name fits
        self._file = open(self._temp, "x", newline="", encoding="utf-8")
        self._finished = self._committed = False
        try:
            self._writer = csv.DictWriter(self._file, fieldnames, extrasaction="ignore")
            self._writer.writeheader()
        except BaseException:
            self.discard()
            raise

    def write(self, row: dict[str, str]) -> None:
        """Append one row (columns not in `fieldnames` are ignored)."""
        self._writer.writerow(row)

    def finish(self) -> None:
        """Write everything to disk and close, without moving it into place yet.

        A full disk raises here rather than in `commit`, so two writers can both be finished
        before either is committed (both files appear, or neither).
        """
        if self._finished:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.discard()
            raise
        self._finished = True

    def commit(self) -> None:
        """Finish, then move the file into place."""
        self.finish()
        os.replace(self._temp, self.path)
        self._committed = True

    def discard(self) -> None:
        """Remove the temp file; `path` is left as it was.

        The file is unlinked before it is closed: closing flushes, which fails again on a full disk.
        """
        self._temp.unlink(missing_ok=True)
        try:
            self._file.close()
        except OSError:  # the data flushed on close was being thrown away anyway
            pass
        self._finished = True

    def __enter__(self) -> "AtomicCsvWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            self.discard()
