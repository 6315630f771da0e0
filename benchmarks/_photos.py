"""Benchmark data: web-size JPEGs made from real photos, Chinese captions, training CSVs.

The photos are scikit-image's sample photos (they ship inside the package, so nothing is
downloaded), cut, scaled and flipped into distinct images with a little sensor grain, so that
they compress like camera JPEGs rather than like smooth upscaled pictures.
"""

import contextlib
import csv
import json
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_ROOT = Path(__file__).resolve().parent.parent / "output" / "bench_photos"
SUBJECTS = ("一只猫", "一杯咖啡", "一位宇航员", "一枚火箭", "一片星空", "眼底照片", "一辆摩托车", "细胞切片")
SCENES = ("在阳光下", "在桌子上", "在夜晚", "在室内", "在远处", "特写", "从侧面拍摄", "颜色鲜艳")
STYLES = ("高清照片", "手机随手拍", "老照片", "网络图片", "局部放大", "宽幅画面")


def source_photos(synthetic: bool = False) -> dict[str, np.ndarray]:
    """scikit-image's colour sample photos by name, or (synthetic, no scikit-image) two smooth patterns."""
    if synthetic:
        y, x = np.mgrid[0:480, 0:640]
        waves = (np.sin(x / 23.0) * np.cos(y / 31.0) * 127 + 128).astype(np.uint8)
        return {
            "gradient": np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8),
            "waves": np.stack([waves, 255 - waves, (x // 3 % 256).astype(np.uint8)], axis=-1),
        }
    from skimage import data  # only the full benchmarks need scikit-image

    motorcycle_left, motorcycle_right, _ = data.stereo_motorcycle()
    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "hubble_deep_field": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(),
        "retina": data.retina(),
        "motorcycle_left": motorcycle_left,
        "motorcycle_right": motorcycle_right,
    }


def grain_tile(side: int, seed: int = 0) -> np.ndarray:
    """Gaussian sensor noise (sigma 3) [side, side, 3] as int16, cut from at random offsets per photo."""
    return np.random.default_rng(seed).normal(0, 3.0, (side, side, 3)).round().astype(np.int16)


def derived_photo(
    source: np.ndarray, sides: tuple[int, int], grain: np.ndarray, rng: random.Random
) -> Image.Image:
    """A random crop of `source`, scaled so both sides fall within `sides`, maybe flipped, with grain.

    `grain` must be larger than `sides[1]` on both sides.
    """
    image = Image.fromarray(source).convert("RGB")
    width, height = rng.randint(*sides), rng.randint(*sides)
    scale = rng.uniform(0.5, 1.0) * min(image.width / width, image.height / height)
    crop_width, crop_height = max(1, int(width * scale)), max(1, int(height * scale))
    left = rng.randint(0, image.width - crop_width)
    top = rng.randint(0, image.height - crop_height)
    box = (left, top, left + crop_width, top + crop_height)
    image = image.resize((width, height), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = rng.randint(0, len(grain) - height), rng.randint(0, len(grain) - width)
    noisy = np.asarray(image, dtype=np.int16) + grain[top : top + height, left : left + width]
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _write_photos(job: tuple[list[tuple[int, Path]], tuple[int, int], int, bool]) -> None:
    numbered_paths, sides, quality, synthetic = job
    sources = source_photos(synthetic)
    names = sorted(sources)
    grain = grain_tile(sides[1] + 64)
    for index, path in numbered_paths:
        rng = random.Random(f"photo-{index}")  # each photo depends only on its index
        photo = derived_photo(sources[names[index % len(names)]], sides, grain, rng)
        photo.save(path, "JPEG", quality=quality)


def make_photos(
    directory: str | Path,
    count: int,
    sides: tuple[int, int] = (800, 1600),
    quality: int = 90,
    synthetic: bool = False,
    workers: int | None = None,
) -> list[Path]:
    """`count` distinct JPEGs in `directory`, reused when an earlier call made the same set."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {"count": count, "sides": list(sides), "quality": quality, "synthetic": synthetic}
    paths = [directory / f"{index:05d}.jpg" for index in range(count)]
    manifest = directory / "photos.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(manifest.read_text()) == recipe and all(path.is_file() for path in paths):
            return paths
    workers = workers or os.cpu_count() or 1
    numbered = list(enumerate(paths))
    jobs = [(numbered[start::workers], sides, quality, synthetic) for start in range(workers)]
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(workers, context) as pool:
        list(pool.map(_write_photos, jobs))
    manifest.write_text(json.dumps(recipe))
    return paths


def benchmark_photos(count: int, quick: bool, root: str | Path = PHOTO_ROOT) -> list[Path]:
    """The shared photo sets: web-size JPEGs (800-1600 px) from real photos, or (quick) small
    synthetic ones; made once under `root` and reused by every benchmark."""
    if quick:
        return make_photos(Path(root) / f"quick_{count}", count, (160, 320), synthetic=True)
    return make_photos(Path(root) / f"web_{count}", count, (800, 1600))


def caption(index: int, min_chars: int = 0) -> str:
    """A Chinese caption of 15 to 30 characters (or, repeated, at least `min_chars`), different
    for neighbouring rows."""
    rng = random.Random(f"caption-{index}")
    text = f"{rng.choice(SUBJECTS)}{rng.choice(SCENES)}，{rng.choice(STYLES)}，编号{index}"
    return "。".join([text] * (1 + min_chars // len(text)))


def write_image_text_csv(path: str | Path, photos: list[Path], min_chars: int = 0) -> Path:
    """A training CSV (text, filename) over `photos`, filenames relative to their directory."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "filename"])
        for index, photo in enumerate(photos):
            writer.writerow([caption(index, min_chars), photo.name])
    return path


def photo_summary(photos: list[Path]) -> dict[str, object]:
    """How a photo set was made (sides, JPEG quality), and its mean size in pixels and bytes."""
    recipe = json.loads((photos[0].parent / "photos.json").read_text())
    pixels = []
    for photo in photos:
        with Image.open(photo) as image:
            pixels.append(image.width * image.height)
    return {
        **recipe,
        "mean_megapixels": round(float(np.mean(pixels)) / 1e6, 2),
        "mean_bytes": round(float(np.mean([photo.stat().st_size for photo in photos]))),
    }
