"""Reading webdataset shards (img2dataset's layout) without torch: which shards a pattern names,
how many samples each holds, and each sample's members as byte ranges of its tar.

A sample is the run of consecutive tar members sharing a key (the member name up to the first
dot of its base name, webdataset's rule): `KEY.jpg`/`.jpeg`/`.png`/`.webp` holds the image,
`KEY.txt` the caption, else `KEY.json`'s "caption". Members are located, not read: a sample's
image is read only when it is used, so skipping samples costs no image reads.
"""

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datatools.atomic import write_json_atomic
from datatools.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"  # open_clip's convention: {"00000.tar": 10000, ...} beside the shards
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardError(UserError, ValueError):
    """Shards the user must fix (none matched, not a tar); the message names the path."""


def is_shard_spec(value: str | os.PathLike) -> bool:
    """Whether a train_file/test_file value names shards (a .tar, a brace pattern, a glob or a
    directory) rather than a CSV file."""
    text = str(value)
    return text.endswith(".tar") or "{" in text or any(c in text for c in "*?[") or os.path.isdir(text)


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00002}.tar` -> three names (zero padding kept); `{a,b}` lists expand too."""
    match = _BRACE_RANGE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        names = [f"{n:0{width}d}" for n in range(int(first), int(last) + 1)]
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [expanded for n in names for expanded in expand_braces(head + n + tail)]
    match = _BRACE_LIST.search(pattern)
    if match:
        choices = match.group(1).split(",")
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]
    return [pattern]


def list_shards(spec: str | os.PathLike) -> list[Path]:
    """The shards a value names, in a fixed order; `ShardError` naming the value when none exist.

    A directory means its `*.tar` files; a brace pattern names each shard (a missing one is an
    error); a glob lists what exists; `::` separates several of these.
    """
    shards: list[Path] = []
    for part in str(spec).split("::"):
        if os.path.isdir(part):
            found = sorted(Path(part).glob("*.tar"))
        elif "{" in part:
            found = [Path(name) for name in expand_braces(part)]
            missing = [str(path) for path in found if not path.is_file()]
            if missing:
                raise ShardError(f"{part}: {len(missing)} shard(s) named by the pattern do not exist, "
                                 f"the first {missing[0]}")  # fmt: skip
        else:
            found = sorted(Path(name) for name in glob.glob(part))
        found = [path for path in found if path.is_file()]
        if not found:
            raise ShardError(f"{part}: no .tar shard matches (a directory, a brace pattern "
                             "such as data/{00000..00099}.tar, or a glob such as data/*.tar)")  # fmt: skip
        shards += found
    return shards


def read_sizes(shards: list[Path]) -> list[int] | None:
    """Each shard's sample count from the `sizes.json` beside it, or None where one is missing."""
    sizes, tables = [], {}
    for shard in shards:
        table_path = shard.parent / SIZES_FILE
        if table_path not in tables:
            try:
                tables[table_path] = json.loads(table_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                tables[table_path] = {}
        size = tables[table_path].get(shard.name)
        if not isinstance(size, int):
            return None
        sizes.append(size)
    return sizes


@dataclass
class TarSample:
    """One sample: its key, its members' byte ranges in the shard, and its caption (or None)."""

    shard: Path
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (offset, size)
    caption: str | None = None
    problem: str | None = None  # why the sample cannot be used (no image, no caption, truncated)

    def image_member(self) -> tuple[int, int] | None:
        return next((self.members[e] for e in IMAGE_EXTENSIONS if e in self.members), None)


def _read(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise EOFError("truncated")
    return data


def _finish(sample: TarSample, file, file_size: int) -> TarSample:
    """Read the caption and judge whether the sample can be used."""
    if any(offset + size > file_size for offset, size in sample.members.values()):
        sample.problem = "truncated shard"
        return sample
    try:
        if "txt" in sample.members:
            sample.caption = _read(file, *sample.members["txt"]).decode("utf-8").strip()
        elif "json" in sample.members:
            caption = json.loads(_read(file, *sample.members["json"])).get("caption")
            sample.caption = caption.strip() if isinstance(caption, str) else None
    except (ValueError, EOFError, AttributeError) as error:
        sample.problem = f"unreadable caption ({type(error).__name__})"
        return sample
    if sample.image_member() is None:
        sample.problem = "no image member (.jpg, .png or .webp)"
    elif not sample.caption:
        sample.problem = "no caption (.txt, or .json with a caption)"
    return sample


def iter_tar_samples(shard: Path) -> Iterator[TarSample]:
    """The samples of one shard, in tar order, usable or not (see `TarSample.problem`).

    Raises `ShardError` for a file that is not a tar; a shard truncated mid-member yields that
    sample with its problem and ends.
    """
    try:
        file_size = os.path.getsize(shard)
        file = open(shard, "rb")  # closed by the `with` below
    except OSError as error:
        raise ShardError(f"{shard}: cannot be read ({error.strerror or error})") from None
    with file:
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except tarfile.TarError:
            raise ShardError(f"{shard}: not a tar file (a shard is an uncompressed .tar)") from None
        sample = None
        try:
            for member in tar:
                match = _KEY.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if sample is not None and key != sample.key:
                    yield _finish(sample, file, file_size)
                    sample = None
                sample = sample or TarSample(shard, key)
                sample.members[extension] = (member.offset_data, member.size)
        except tarfile.TarError:  # a damaged header: what came before it is still usable
            if sample is not None:
                sample.problem = "truncated shard"
        if sample is not None:
            yield _finish(sample, file, file_size)


def read_member(shard: Path, member: tuple[int, int]) -> bytes:
    """The bytes of one member; `EOFError` where the shard ends early."""
    with open(shard, "rb") as file:
        return _read(file, *member)


def count_samples(shard: Path) -> int:
    """The number of samples (usable or not) in one shard, from its tar headers."""
    return sum(1 for _ in iter_tar_samples(shard))


def shard_sizes(shards: list[Path], cache_file: Path | None = None) -> list[int]:
    """Sample counts: from sizes.json, else counted once and kept in `cache_file` (keyed by each
    shard's path, size and modification time, so a rewritten shard is counted again)."""
    sizes = read_sizes(shards)
    if sizes is not None:
        return sizes
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except ValueError:
            cache = {}
    sizes = []
    for shard in shards:
        stat = shard.stat()
        key = f"{shard.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = count_samples(shard)
        sizes.append(cache[key])
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    return sizes
