"""Downloaded images as webdataset shards, in img2dataset's layout.

Shard k holds rows `k * shard_size` to `(k + 1) * shard_size - 1` of the CSV, in row order,
whatever order the downloads finish in, so the same input and shard size always give the same
shards and N machines can each take every N-th shard (`Part`) with no coordination. A shard is
`{k:05d}.tar` (`KEY.jpg`, `KEY.txt`, `KEY.json` per downloaded row), `{k:05d}_stats.json` (its
counts, as img2dataset writes them) and `{k:05d}_failed.csv` (its failed rows, with a `reason`).
The tar is written under a hidden temp name and renamed when complete; the stats file, written
last, marks the shard finished. `sizes.json` (open_clip's convention) lists the finished shards.
"""

import io
import json
import math
import os
import re
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatools.atomic import sync_path, write_json_atomic
from datatools.csv_rows import AtomicCsvWriter, InputError
from datatools.download import ConvertedImage
from datatools.fetch import check_url
from datatools.image_check import RejectedError
from datatools.shards import SIZES_FILE

SHARD_NAME_DIGITS = 5  # img2dataset's default oom_shard_count
DEFAULT_SHARD_SIZE = 10_000
# Tar members get a fixed time, so that the same images always give byte-identical shards.
MEMBER_MTIME = 0
# Failures while decoding the body; img2dataset counts these as failed_to_resize.
CONVERSION_REASONS = frozenset({"empty", "not_an_image", "truncated", "decode_error", "decompression_bomb"})
_STATS_PATTERN = re.compile(r"^(\d+)_stats\.json$")


@dataclass(frozen=True)
class ShardLayout:
    """Which rows go into which shard, and the keys img2dataset gives them."""

    shard_size: int
    rows: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise InputError(f"--shard_size must be at least 1, got {self.shard_size}")

    @property
    def shard_count(self) -> int:
        return math.ceil(self.rows / self.shard_size)

    def rows_in(self, shard: int) -> int:
        """How many rows shard `shard` holds (all but the last hold `shard_size`)."""
        return max(0, min(self.shard_size, self.rows - shard * self.shard_size))

    def key(self, shard: int, position: int) -> str:
        """img2dataset's key: `10**digits * shard + position`, zero-padded (`000000012` at size 10,000)."""
        digits = math.ceil(math.log10(self.shard_size)) if self.shard_size > 1 else 0
        return f"{10**digits * shard + position:0{digits + SHARD_NAME_DIGITS}d}"


def shard_name(shard: int) -> str:
    """`00012` for shard 12."""
    return f"{shard:0{SHARD_NAME_DIGITS}d}"


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (1-based): the shards whose number modulo `count` is `index - 1`."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Part":
        """`"2/8"` -> Part(2, 8); raises `InputError` naming the value."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise InputError(f"--part must be K/N with 1 <= K <= N (say 3/8), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index - 1


def is_finished(output: Path, shard: int) -> bool:
    """Whether shard `shard` is complete in `output`: its tar and its stats file exist."""
    name = shard_name(shard)
    return (output / f"{name}.tar").is_file() and (output / f"{name}_stats.json").is_file()


def finished_sizes(output: Path) -> dict[str, int]:
    """`{"00000.tar": samples, ...}` for every finished shard in `output` (read from the stats files)."""
    sizes = {}
    for path in output.iterdir():
        match = _STATS_PATTERN.match(path.name)
        if match and (output / f"{match[1]}.tar").is_file():
            try:
                sizes[f"{match[1]}.tar"] = int(json.loads(path.read_text(encoding="utf-8"))["successes"])
            except (OSError, ValueError, KeyError, TypeError):  # not ours, or damaged: left out, not fatal
                continue
    return dict(sorted(sizes.items()))


def sample_metadata(row: dict[str, str], key: str, image: ConvertedImage) -> dict[str, Any]:
    """The `KEY.json` of a row, with img2dataset's fields: the row's columns (`text` as `caption`),
    then `key`, `status`, `error_message`, the stored and original size, and `sha256` of the body."""
    meta: dict[str, Any] = {"url": row.get("url", "")}
    if "text" in row:
        meta["caption"] = row["text"]
    meta.update({name: value for name, value in row.items() if name not in ("url", "text")})
    meta.update(key=key, status="success", error_message=None, width=image.width, height=image.height)
    meta.update(original_width=image.original_width, original_height=image.original_height)
    meta["sha256"] = image.sha256
    return meta


class ShardWriter:
    """One shard being written: its rows are recorded in any order and written to a hidden temp
    tar in row order, holding back only those that finished before an earlier row."""

    def __init__(self, output: Path, layout: ShardLayout, shard: int, fieldnames: Sequence[str]) -> None:
        self.output, self.layout, self.shard = output, layout, shard
        self.name = shard_name(shard)
        self.expected = layout.rows_in(shard)
        self.status: Counter[str] = Counter()
        self._next = 0
        self._held: dict[int, tuple[dict[str, str], ConvertedImage | str]] = {}
        self._started = time.time()
        self._temp = output / f".{uuid.uuid4().hex}.tmp"
        self._file = open(self._temp, "xb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        columns = [name for name in fieldnames if name not in ("key", "reason")] + ["key", "reason"]
        try:
            self._failed = AtomicCsvWriter(output / f"{self.name}_failed.csv", columns)
        except BaseException:  # a full disk: the temp tar must not stay behind
            self._temp.unlink(missing_ok=True)
            self._file.close()
            raise

    @property
    def done(self) -> bool:
        """Whether every row of the shard has been written."""
        return self._next == self.expected

    def record(self, position: int, row: dict[str, str], outcome: ConvertedImage | str) -> None:
        """Take row `position`'s outcome (a converted image or a failure reason); write what is in order."""
        self._held[position] = (row, outcome)
        while self._next in self._held:
            row, outcome = self._held.pop(self._next)
            key = self.layout.key(self.shard, self._next)
            if isinstance(outcome, ConvertedImage):
                self._add_sample(row, key, outcome)
                self.status["success"] += 1
            else:
                self._failed.write({**row, "key": key, "reason": outcome})
                self.status[outcome] += 1
            self._next += 1

    def _add_sample(self, row: dict[str, str], key: str, image: ConvertedImage) -> None:
        members = [(f"{key}.jpg", image.jpeg)]
        if "text" in row:
            members.append((f"{key}.txt", row["text"].encode("utf-8")))
        meta = json.dumps(sample_metadata(row, key, image), ensure_ascii=False, indent=4)
        members.append((f"{key}.json", meta.encode("utf-8")))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, 0o444
            self._tar.addfile(info, io.BytesIO(data))

    def stats(self, end_time: float) -> dict[str, Any]:
        """img2dataset's stats fields, plus the reasons in our own words and the failed-row file."""
        failed = {reason: count for reason, count in self.status.items() if reason != "success"}
        return {
            "count": self.expected,
            "successes": self.status["success"],
            "failed_to_download": sum(n for r, n in failed.items() if r not in CONVERSION_REASONS),
            "failed_to_resize": sum(n for r, n in failed.items() if r in CONVERSION_REASONS),
            "duration": round(end_time - self._started, 3),
            "start_time": self._started,
            "end_time": end_time,
            "status_dict": dict(self.status.most_common()),
            "failed_rows": f"{self.name}_failed.csv",
        }

    def commit(self) -> int:
        """Close the tar, move it and the failed rows into place, then write the stats; the samples."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._failed.commit()
        os.replace(self._temp, self.output / f"{self.name}.tar")
        sync_path(self.output)
        write_json_atomic(self.output / f"{self.name}_stats.json", self.stats(time.time()))
        return self.status["success"]

    def discard(self) -> None:
        """Remove the temp tar and failed rows (the tar is unlinked first: closing flushes, which a
        full disk refuses)."""
        self._temp.unlink(missing_ok=True)
        self._failed.discard()
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError, tarfile.TarError):
                pass


class ShardedOutput:
    """The shards of one run: which to write (this part's, not yet finished), the writers of those
    open, `sizes.json`, and the run's counts."""

    def __init__(self, output: Path, layout: ShardLayout, part: Part, fieldnames: Sequence[str]) -> None:
        self.output, self.layout, self.fieldnames = output, layout, fieldnames
        mine = [shard for shard in range(layout.shard_count) if part.owns(shard)]
        self.todo = {shard for shard in mine if not is_finished(output, shard)}
        self.counts: Counter[str] = Counter(ok=0, failed=0, shards_written=0)
        self.counts["skipped"] = sum(layout.rows_in(shard) for shard in mine if shard not in self.todo)
        self.counts["shards_already_there"] = len(mine) - len(self.todo)
        self.reasons: Counter[str] = Counter()
        self.writers: dict[int, ShardWriter] = {}
        self._sizes = finished_sizes(output)

    @property
    def rows_to_do(self) -> int:
        return sum(self.layout.rows_in(shard) for shard in self.todo)

    def tasks(self, rows: Iterable[dict[str, str]]) -> Iterator[tuple[tuple, str, str | None]]:
        """`(row_item, url, None)` for each row of a shard to write, or `(row_item, "", reason)` for a
        row that fails without a request; opens each shard's writer at its first row."""
        for index, row in enumerate(rows):
            shard, position = divmod(index, self.layout.shard_size)
            if shard not in self.todo:
                continue
            if position == 0:
                self.writers[shard] = ShardWriter(self.output, self.layout, shard, self.fieldnames)
            try:
                yield (shard, position, row), check_url(row.get("url", "")), None
            except RejectedError as error:
                yield (shard, position, row), "", error.reason

    def record(self, item: tuple, outcome: ConvertedImage | str) -> None:
        """Count one row's outcome into its shard; a shard whose rows are all in is committed."""
        shard, position, row = item
        if isinstance(outcome, ConvertedImage):
            self.counts["ok"] += 1
        else:
            self.counts["failed"] += 1
            self.reasons[outcome] += 1
        writer = self.writers[shard]
        writer.record(position, row, outcome)
        if writer.done:
            samples = writer.commit()
            del self.writers[shard]
            self.counts["shards_written"] += 1
            self._sizes[f"{writer.name}.tar"] = samples
            write_json_atomic(self.output / SIZES_FILE, dict(sorted(self._sizes.items())))

    def finish(self) -> None:
        """After the last row: `sizes.json` from every finished shard on disk (other parts' too).

        Raises `InputError` when a shard is still open: the input had fewer rows than counted.
        """
        if self.writers:
            self.discard()
            raise InputError("the input changed during the run (fewer rows than counted); run again")
        write_json_atomic(self.output / SIZES_FILE, finished_sizes(self.output))

    def discard(self) -> None:
        """Drop every shard still being written; finished shards stay."""
        for writer in self.writers.values():
            writer.discard()
        self.writers.clear()
