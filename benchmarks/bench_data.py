"""Benchmark the data path at scale: start-up time and peak memory per process, CSV and shards,
and training input images/s from shards against the same images as files.

    python -m benchmarks.bench_data                       # 10k and 1M samples (a few minutes)
    python -m benchmarks.bench_data --sizes 10000000      # the 10M-row CSV (needs ~2 GB of disk)
    python -m benchmarks.bench_data --quick               # seconds
    python -m benchmarks.bench_data --sizes --input_images 0   # only the 1M and 10M shards of sizes.json

Each figure comes from a fresh Python process, as a training process starts:

- `csv_first`: a synthetic CSV (N rows naming a pool of tiny JPEGs) converted into the row store,
  then the first batch of 32 in training's shuffled order; `csv_second`: the same on the second
  run (the store is mapped);
- `shards`: webdataset shards of N real samples (img2dataset's layout, with sizes.json), the
  stream built and its first batch read (shards are written only up to --max_shard_samples);
- `seconds_to_first_batch` is measured after the imports (torch alone takes a few seconds);
  `peak_rss_mb` is the process's peak resident memory, imports included;
- `claimed_shards`: 1,000 small real shards (16 real samples each) whose sizes.json claims
  N / 1,000 samples each, for N of 1M and 10M without writing gigabytes. The stream is built
  from sizes.json and cycles its shards, so start-up and memory do not depend on the samples
  being there: this measures the start-up (listing, sizes, the stream's length and order) and
  the first batch (the 1,000-sample shuffle buffer filled from about 65 shards, where a real
  10,000-sample shard would fill it from one), not reading N samples;
- `input`: images/s through a DataLoader (batch 32, 2 workers, 224 px crops) from shards and
  from the same JPEGs as files.

Prints one JSON object.
"""

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._machine import cpu_model, load_average

BATCH = 32
POOL = 256  # distinct tiny JPEGs the synthetic rows name


def tiny_jpegs(count: int, side: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
        images.append(buffer.getvalue())
    return images


def write_csv(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write("text,filename\n")
        for start in range(0, rows, 100_000):
            file.writelines(
                f"一张合成图片 {i},{i % POOL:05d}.jpg\n" for i in range(start, min(rows, start + 100_000))
            )


def write_shards(directory: Path, samples: int, jpegs: list[bytes], shard_size: int = 10_000) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard, start in enumerate(range(0, samples, shard_size)):  # real samples, each written
        name = f"{shard:05d}.tar"
        with tarfile.open(directory / name, "w") as tar:
            for i in range(start, min(samples, start + shard_size)):
                for extension, data in (
                    ("jpg", jpegs[i % len(jpegs)]),
                    ("txt", f"一张合成图片 {i}".encode()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = min(samples, start + shard_size) - start
    (directory / "sizes.json").write_text(json.dumps(sizes))


CLAIMED_SHARDS = 1_000
REAL_PER_CLAIMED_SHARD = 16


def claimed_shards(sizes: list[int], root: Path, jpegs: list[bytes]) -> dict:
    """Shards of N samples as sizes.json claims them: 1,000 real shards of 16 samples, and a
    sizes.json giving each N / 1,000 (see the module docstring for what that measures)."""
    directory = root / "claimed_shards"
    write_shards(directory, CLAIMED_SHARDS * REAL_PER_CLAIMED_SHARD, jpegs, shard_size=REAL_PER_CLAIMED_SHARD)
    figures = {}
    for size in sizes:
        claimed = {f"{shard:05d}.tar": size // CLAIMED_SHARDS for shard in range(CLAIMED_SHARDS)}
        (directory / "sizes.json").write_text(json.dumps(claimed))
        row = measure("shards", directory, directory)
        row["samples_from"] = (f"sizes.json: {CLAIMED_SHARDS} shards x {size // CLAIMED_SHARDS} claimed; "
                               f"{CLAIMED_SHARDS * REAL_PER_CLAIMED_SHARD} real samples on disk")  # fmt: skip
        row["measures"] = ("start-up (shard list, sizes.json, the stream's length and order) and the "
                           "first batch; start-up and memory do not read the samples")  # fmt: skip
        figures[str(size)] = row
    return figures


def transform():
    from component.processor import ImageTransform

    return ImageTransform(shortest_edge=224, resize_to=None, crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3,
                          resample=3)  # fmt: skip


def child(kind: str, path: str, images: str, workers: int, batches: int) -> dict:
    """In a fresh process: build the dataset, read `batches` batches; time and peak memory."""
    from torch.utils.data import DataLoader

    from component.training.dataset import ImageTextDataset
    from component.training.loaders import EpochPermutation
    from component.training.row_store import load_rows
    from component.training.shards import ShardStream
    from datatools.shards import list_shards, shard_sizes

    start = time.perf_counter()
    if kind == "csv":
        dataset = ImageTextDataset(load_rows(path, None, Path(images)), images, transform())
    else:
        shards = list_shards(path)
        dataset = ShardStream(shards, sum(shard_sizes(shards)), transform(), name=path, batch_size=BATCH,
                              seed=0, shuffle_buffer=1000)  # fmt: skip
    sampler = EpochPermutation(len(dataset), 0) if kind == "csv" else None  # as training shuffles
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=len, sampler=sampler)
    first, count, iterator = None, 0, iter(loader)
    for _ in range(batches):
        count += next(iterator)
        first = first or time.perf_counter() - start
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds_to_first_batch": round(first, 2), "peak_rss_mb": round(peak, 1),
            "images_per_second": round(count / (elapsed - first), 1) if batches > 1 else None}  # fmt: skip


def measure(kind: str, path: Path, images: Path, workers: int = 0, batches: int = 1) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_data", "--child", kind, str(path), str(images),
               str(workers), str(batches)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def scale(sizes: list[int], max_shard_samples: int, root: Path, jpegs: list[bytes]) -> dict:
    images = root / "images"
    images.mkdir()
    for i in range(POOL):
        (images / f"{i:05d}.jpg").write_bytes(jpegs[i])
    figures = {}
    for size in sizes:
        csv = root / f"{size}.csv"
        write_csv(csv, size)
        row = {"csv_first": measure("csv", csv, images), "csv_second": measure("csv", csv, images)}
        if size <= max_shard_samples:
            write_shards(root / f"shards_{size}", size, jpegs)
            row["shards"] = measure("shards", root / f"shards_{size}", images)
        figures[str(size)] = row
        csv.unlink()  # our own synthetic file; the next size gets its own
    return figures


def input_speed(count: int, root: Path, jpegs: list[bytes]) -> dict:
    """Images/s through 2 workers from shards and from the same JPEGs as files."""
    files = root / "input_files"
    files.mkdir()
    with open(root / "input.csv", "w", encoding="utf-8") as file:
        file.write("text,filename\n")
        for i in range(count):
            (files / f"{i:05d}.jpg").write_bytes(jpegs[i % len(jpegs)])
            file.write(f"一张合成图片 {i},{i:05d}.jpg\n")
    write_shards(root / "input_shards", count, jpegs, shard_size=count // 4)
    batches = count // BATCH - 1
    return {"files": measure("csv", root / "input.csv", files, 2, batches),
            "shards": measure("shards", root / "input_shards", files, 2, batches)}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 1_000_000])
    parser.add_argument(
        "--claimed_sizes",
        type=int,
        nargs="*",
        default=[1_000_000, 10_000_000],
        help="shard sample counts measured with sizes.json claims (see claimed_shards)",
    )
    parser.add_argument("--max_shard_samples", type=int, default=100_000)
    parser.add_argument("--input_images", type=int, default=2_000, help="0: no input speed figures")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "PATH", "IMAGES", "WORKERS", "BATCHES"))
    args = parser.parse_args(argv)
    if args.child:
        kind, path, images, workers, batches = args.child
        print(json.dumps(child(kind, path, images, int(workers), int(batches))))
        return {}
    if args.quick:
        args.sizes, args.input_images, args.claimed_sizes = [2_000], 320, []
    jpegs = tiny_jpegs(POOL)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load_average()},
                  "scale": scale(args.sizes, args.max_shard_samples, root, jpegs),
                  "claimed_shards": claimed_shards(args.claimed_sizes, root, jpegs),
                  "input": input_speed(args.input_images, root, tiny_jpegs(64, side=256))
                  if args.input_images else None}  # fmt: skip
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
