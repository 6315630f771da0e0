"""img2dataset's webdataset output, written exactly as it writes it, from a CSV and its images."""

import csv
import io
import json
import tarfile
from pathlib import Path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shards(csv_path: Path, image_dir: Path, out_dir: Path, shard_size: int,
                             caption_in_txt: bool = True, sizes_json: bool = True) -> list[Path]:  # fmt: skip
    """`NNNNN.tar` (members KEY.jpg, KEY.json, KEY.txt, in webdataset's sorted order; KEY is the
    shard number and the sample's number in it, 9 digits), `NNNNN_stats.json`, `NNNNN.parquet`
    left out (optional in img2dataset), and `sizes.json` (open_clip's) when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(csv_path, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    shards, sizes = [], {}
    for shard_id, start in enumerate(range(0, len(rows), shard_size)):
        path = out_dir / f"{shard_id:05d}.tar"
        chunk = rows[start : start + shard_size]
        with tarfile.open(path, "w") as tar:
            for index, row in enumerate(chunk):
                key = f"{shard_id:05d}{index:04d}"
                meta = {"url": row.get("url", ""), "key": key, "status": "success", "error_message": None,
                        "width": 30, "height": 30, "original_width": 30, "original_height": 30,
                        "caption": row["text"]}  # fmt: skip
                add_member(tar, f"{key}.jpg", (image_dir / row["filename"]).read_bytes())
                add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
                if caption_in_txt:
                    add_member(tar, f"{key}.txt", row["text"].encode())
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(chunk)}}  # fmt: skip
        (out_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats))
        sizes[path.name] = len(chunk)
        shards.append(path)
    if sizes_json:
        (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return shards
