"""Which kind of data a train_file, test_file or --input value names, decided in one place."""

from pathlib import Path
from typing import Literal

from datatools.cn_clip_data import is_cn_clip_data
from datatools.shards import is_shard_spec

DataKind = Literal["cn_clip", "shards", "csv"]


def data_kind(path: str | Path) -> DataKind:
    """ "cn_clip" (a *_texts.jsonl or a Chinese-CLIP LMDB directory), "shards" (a .tar, a brace
    pattern, a glob or a directory of them) or "csv" (anything else: a CSV, whose filenames are
    relative to an image_path). Chinese-CLIP data is tried first: a directory may be either."""
    if is_cn_clip_data(path):
        return "cn_clip"
    if is_shard_spec(str(path)):
        return "shards"
    return "csv"
