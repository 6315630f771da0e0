"""Benchmark download_image.py against this machine's CPU-only limit (and img2dataset, if given).

    python benchmarks/bench_download.py                      # 2,000 photos, prints JSON
    python benchmarks/bench_download.py --img2dataset_python /path/to/venv/bin/python
    python benchmarks/bench_download.py --quick              # a few seconds, synthetic images

Each round runs both output formats of download_image.py (files, and webdataset shards of
`--shard_size`); img2dataset writes the format named by `--img2dataset_format`.

Photos (scikit-image's sample photos, cropped and scaled to 640-1600 px, with a little grain so
they compress like camera JPEGs) are served from a loopback server in another process that adds
`--latency` seconds before each response. The CPU-only limit is the same decode + resize + encode
(`to_training_jpeg`) of the same files on all cores, with no network.
"""

import argparse
import asyncio
import contextlib
import csv
import io
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


# --- the loopback server (run as `bench_download.py --serve DIR`; it imports nothing heavy) ---


async def _serve(directory: Path, latency: float, lifetime: float) -> None:
    """HTTP/1.1 keep-alive file server on 127.0.0.1; prints its port, stops after `lifetime` s."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                name = unquote(request.split(b" ", 2)[1].decode("latin-1")).lstrip("/")
                await asyncio.sleep(latency)
                path = directory / name
                if "/" in name or not path.is_file():
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    body = path.read_bytes()
                    head = (
                        f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
                    )
                    writer.write(head.encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.sleep(lifetime)


def start_server(directory: Path, latency: float) -> tuple[subprocess.Popen, int]:
    """Start the file server in its own process; returns it and its port."""
    command = [sys.executable, __file__, "--serve", str(directory), "--latency", str(latency)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())


# --- test photos ---


def source_photos(quick: bool) -> list[np.ndarray]:
    """scikit-image's colour photos, or (quick mode, no scikit-image needed) smooth synthetic ones."""
    if quick:
        y, x = np.mgrid[0:300, 0:400]
        return [np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)]
    from skimage import data  # only the full benchmark needs scikit-image

    loaders = [data.astronaut, data.chelsea, data.coffee, data.hubble_deep_field, data.immunohistochemistry]
    loaders += [
        data.rocket,
        data.retina,
        lambda: data.stereo_motorcycle()[0],
        lambda: data.stereo_motorcycle()[1],
    ]
    return [loader() for loader in loaders]


def make_photos(
    directory: Path, count: int, sides: tuple[int, int], quick: bool, seed: int = 0
) -> list[Path]:
    """`count` distinct JPEGs (random crop, scale, flip, grain, quality) with sides within `sides`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{index:05d}.jpg" for index in range(count)]
    if all(path.is_file() for path in paths):
        return paths
    rng = random.Random(seed)
    sources = [Image.fromarray(array).convert("RGB") for array in source_photos(quick)]
    grain = np.random.default_rng(seed).normal(0, 4, (sides[1] * 2, sides[1] * 2, 3)).astype(np.int16)
    for path in paths:
        source = rng.choice(sources)
        width, height = rng.randint(*sides), rng.randint(*sides)
        scale = rng.uniform(0.6, 1.0) * min(source.width / width, source.height / height)
        crop_w, crop_h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, source.width - crop_w), rng.randint(0, source.height - crop_h)
        image = source.resize(
            (width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h)
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        offset_x, offset_y = rng.randint(0, grain.shape[1] - width), rng.randint(0, grain.shape[0] - height)
        noisy = (
            np.asarray(image, dtype=np.int16)
            + grain[offset_y : offset_y + height, offset_x : offset_x + width]
        )
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=rng.randint(80, 95))
    return paths


# --- the measurements ---


def _convert_files(paths: list[Path]) -> int:
    from datatools.download import to_training_jpeg

    return sum(len(to_training_jpeg(path.read_bytes())) for path in paths)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cpu_limit(paths: list[Path], workers: int) -> dict[str, float]:
    """Images/s for decode + resize + encode of the files on `workers` processes, no network,
    and the CPU milliseconds each image took (counted when the workers exit)."""
    batches = [paths[index : index + 16] for index in range(0, len(paths), 16)]
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    cpu_before = _cpu_seconds(resource.RUSAGE_CHILDREN)
    with ProcessPoolExecutor(workers, mp_context=context) as executor:
        list(executor.map(_convert_files, [paths[:1]] * workers))  # start and warm up every worker
        started = time.perf_counter()
        list(executor.map(_convert_files, batches))
        seconds = time.perf_counter() - started
    cpu_ms = (_cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before) * 1000 / (len(paths) + workers)
    return {"images_per_s": round(len(paths) / seconds, 1), "cpu_ms_per_image": round(cpu_ms, 2)}


def write_url_csv(path: Path, photos: list[Path], port: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "url", "filename"])
        for photo in photos:
            writer.writerow(
                ["一张照片", f"http://127.0.0.1:{port}/{photo.name}", f"{photo.stem[:3]}/{photo.name}"]
            )


def run_ours(
    csv_path: Path, output: Path, threads: int | None, output_format: str = "files", shard_size: int = 1000
) -> dict[str, float]:
    """Run download_image.main in this process; images/s over its wall time, and stored bytes."""
    import download_image

    argv = ["--input", str(csv_path), "--output", str(output), "--output_format", output_format]
    argv += ["--shard_size", str(shard_size)] + (["--threads", str(threads)] if threads else [])
    cpu_before, started = _cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON figures
        exit_code = download_image.main(argv)
    seconds = time.perf_counter() - started
    cpu_ms = (_cpu_seconds(resource.RUSAGE_SELF) - cpu_before) * 1000
    if output_format == "files":
        report = json.loads((output / "download_report.json").read_text())
        ok, failed = report["ok"], report["failed"]
    else:
        stats = [json.loads(path.read_text()) for path in output.glob("*_stats.json")]
        ok = sum(item["successes"] for item in stats)
        failed = sum(item["count"] - item["successes"] for item in stats)
    # shards: tar bytes per sample (the JPEG, caption, metadata and tar headers)
    stored = sum(
        path.stat().st_size for path in output.rglob("*.jpg" if output_format == "files" else "*.tar")
    )
    return {
        "exit_code": exit_code,
        "ok": ok,
        "failed": failed,
        "seconds": round(seconds, 2),
        "images_per_s": round(ok / seconds, 1),
        "cpu_ms_per_image": round(cpu_ms / max(1, ok), 2),
        "mean_stored_bytes": round(stored / max(1, ok)),
    }


def run_img2dataset(
    python: str, csv_path: Path, output: Path, workers: int, output_format: str = "files"
) -> dict[str, object]:
    """img2dataset with matching settings (short side 256, JPEG 90, no hashing); its own timing."""
    options = {
        "url_list": str(csv_path),
        "output_folder": str(output),
        "input_format": "csv",
        "url_col": "url",
        "output_format": output_format,
        "image_size": 256,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": True,
        "encode_quality": 90,
        "processes_count": workers,
        "compute_hash": None,
        "extract_exif": False,
        "timeout": 10,
        "retries": 2,
    }
    rows = sum(1 for _ in open(csv_path, encoding="utf-8")) - 1
    options["number_sample_per_shard"] = -(-rows // workers)
    code = f"import img2dataset; img2dataset.download(**{options!r})"
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    try:
        started = time.perf_counter()
        subprocess.run([python, "-c", code], check=True, capture_output=True, env=environment, timeout=900)
        wall = time.perf_counter() - started
    except (OSError, subprocess.SubprocessError) as error:
        return {"skipped": f"img2dataset did not run: {error}"}
    stats = [json.loads(path.read_text()) for path in output.glob("*_stats.json")]
    seconds = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    ok = sum(s["successes"] for s in stats)
    return {
        "ok": ok,
        "seconds": round(seconds, 2),
        "images_per_s": round(ok / seconds, 1),
        "wall_seconds_with_startup": round(wall, 2),
        "threads_per_process": 256,
        "processes": workers,
        "output_format": output_format,
    }


def resize_quality(paths: list[Path]) -> float:
    """Mean PSNR (dB) of `to_training_jpeg` against a full decode + Lanczos resize to the same size."""
    from datatools.download import to_training_jpeg

    scores = []
    for path in paths:
        with Image.open(path) as original:
            converted = Image.open(io.BytesIO(to_training_jpeg(path.read_bytes())))
            reference = original.convert("RGB").resize(converted.size, Image.Resampling.LANCZOS)
        error = np.asarray(converted, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
        scores.append(10 * np.log10(255**2 / max(np.mean(error**2), 1e-10)))
    return round(float(np.mean(scores)), 1)


def machine() -> dict[str, object]:
    """The CPU model, core count, and versions that the figures depend on."""
    from benchmarks._machine import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": Image.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="40 small synthetic images, one round: a smoke run"
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternate CPU-limit and download runs; medians"
    )
    parser.add_argument("--latency", type=float, default=0.03, help="server delay per request, seconds")
    parser.add_argument(
        "--threads", type=int, default=None, help="download_image.py --threads (default: its own)"
    )
    parser.add_argument(
        "--workdir", default=str(REPO / "output" / "bench_download"), help="photos and outputs"
    )
    parser.add_argument("--img2dataset_python", default=None, help="a Python with img2dataset installed")
    parser.add_argument(
        "--img2dataset_format", default="webdataset", choices=("files", "webdataset"), help="its output"
    )
    parser.add_argument("--shard_size", type=int, default=1000, help="rows per shard, both downloaders")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _median(items: list[dict], key: str) -> float:
    return round(statistics.median(item[key] for item in items), 2)


def summarise_download(runs: list[dict], limits: list[dict], workers: int) -> dict[str, object]:
    """Median and best images/s of `runs`, against the CPU-only limit of the same rounds."""
    limit, download = _median(limits, "images_per_s"), _median(runs, "images_per_s")
    best_limit = max(item["images_per_s"] for item in limits)
    best_download = max(run["images_per_s"] for run in runs)
    limit_cpu_ms, download_cpu_ms = _median(limits, "cpu_ms_per_image"), _median(runs, "cpu_ms_per_image")
    return {
        "images_per_s": download,
        "per_core": round(download / workers, 1),
        "fraction_of_cpu_limit": round(download / limit, 3),
        "best_round": best_download,
        "best_fraction_of_best_cpu_limit": round(best_download / best_limit, 3),
        "cpu_ms_per_image": download_cpu_ms,
        "cpu_efficiency": round(limit_cpu_ms / download_cpu_ms, 3),
        "rounds": [run["images_per_s"] for run in runs],
        "failed": sum(run["failed"] for run in runs),
        "stored_bytes_per_image": runs[-1]["mean_stored_bytes"],
    }


def measure(photos: list[Path], workdir: Path, port: int, args: argparse.Namespace) -> dict[str, object]:
    """Alternate the CPU-only limit and our download to files and to shards `rounds` times (other
    load on the machine then hits all alike); medians, the ratios, and the size stored per image.

    `cpu_efficiency` compares CPU time per image (conversion only / whole download), which other
    load on a shared machine disturbs far less than images/s.
    """
    workers = os.cpu_count() or 1
    write_url_csv(workdir / "urls.csv", photos, port)
    limits: list[dict] = []
    runs: dict[str, list[dict]] = {"files": [], "webdataset": []}
    for round_index in range(1 if args.quick else args.rounds):
        limits.append(cpu_limit(photos, workers))
        formats = ["files", "webdataset"] if round_index % 2 == 0 else ["webdataset", "files"]
        for output_format in formats:  # each goes first in every other round
            output = workdir / f"ours_{output_format}"
            shutil.rmtree(output, ignore_errors=True)
            result = run_ours(workdir / "urls.csv", output, args.threads, output_format, args.shard_size)
            runs[output_format].append(result)
    limit = _median(limits, "images_per_s")
    files = summarise_download(runs["files"], limits, workers)
    shards = summarise_download(runs["webdataset"], limits, workers)
    return {
        "cpu_limit": {
            "images_per_s": limit,
            "per_core": round(limit / workers, 1),
            "cpu_ms_per_image": _median(limits, "cpu_ms_per_image"),
            "best_round": max(item["images_per_s"] for item in limits),
            "rounds": [item["images_per_s"] for item in limits],
        },
        "download": {**files, "threads": args.threads or "default"},
        "download_webdataset": {
            **shards,
            "shard_size": args.shard_size,
            "against_files": round(shards["images_per_s"] / files["images_per_s"], 3),
        },
        "stored_bytes_per_image": files["stored_bytes_per_image"],
        "disk_gb_per_million_images": round(files["stored_bytes_per_image"] * 1e6 / 1e9, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Make the photos, then measure; print one JSON object."""
    args = parse_args(argv)
    if args.serve:
        asyncio.run(_serve(Path(args.serve), args.latency, lifetime=1800))
        return 0
    workdir = Path(args.workdir)
    count, sides = (40, (200, 400)) if args.quick else (args.images, (640, 1600))
    photos = make_photos(workdir / ("photos_quick" if args.quick else "photos"), count, sides, args.quick)
    sizes = [path.stat().st_size for path in photos]
    figures: dict[str, object] = {
        "machine": machine(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "latency_s": args.latency,
        "photos": {
            "count": len(photos),
            "sides_px": list(sides),
            "mean_bytes": round(statistics.mean(sizes)),
        },
        "psnr_db_vs_full_decode_lanczos": resize_quality(photos[:: max(1, len(photos) // 50)]),
    }
    server, port = start_server(photos[0].parent, args.latency)
    try:
        figures.update(measure(photos, workdir, port, args))
        if args.img2dataset_python and not args.quick:
            shutil.rmtree(workdir / "img2dataset", ignore_errors=True)
            peer = run_img2dataset(
                args.img2dataset_python,
                workdir / "urls.csv",
                workdir / "img2dataset",
                os.cpu_count(),
                args.img2dataset_format,
            )
            figures["img2dataset"] = peer
    finally:
        server.terminate()
        server.wait()
    figures["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
