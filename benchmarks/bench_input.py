"""Benchmark the training input pipeline: this project's against the per-item image processor.

    python -m benchmarks.bench_input            # 1,000 web-size JPEGs (800-1600 px), prints JSON
    python -m benchmarks.bench_input --quick    # a few seconds on small synthetic images

Both pipelines read the same JPEGs through a DataLoader with the same batch size and workers,
and give the same tensors: 224 px pixel values for a CLIP image tower and token ids for BERT.

- this project: `ImageTextDataset` (PIL draft-mode decode, resize and crop to uint8 in the
  workers) and `ImageTextCollator` (tokenise, stack uint8), then the whole batch normalised at
  once in the main process, where a CPU run does it (a GPU run does it on the GPU);
- per item, as in the Hugging Face run_clip recipe: open the full image with PIL and run the
  CLIP image processor and the tokenizer on each sample, then stack.

Figures: images/s over whole epochs (worker start-up included, as in training), CPU
milliseconds per image (all processes; less disturbed by other load on the machine than
images/s), and how far this project's pixel values are from the per-item processor's.
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, default_collate
from transformers import CLIPImageProcessorPil

from benchmarks._machine import load_average, machine
from benchmarks._photos import PHOTO_ROOT, benchmark_photos, photo_summary, write_image_text_csv
from benchmarks._run_clip import PerItemProcessorDataset, run_clip_dataset, run_clip_processor
from component.processor import ImageTransform, build_processor
from component.testing.tiny import write_chinese_tokenizer
from component.training.collator import ImageTextCollator
from component.training.dataset import ImageTextDataset, read_image_text_csv


def write_processor_sources(directory: Path, image_size: int) -> tuple[Path, Path]:
    """A CLIP image processor (OpenAI CLIP's settings at `image_size`) and the Chinese BERT tokenizer."""
    clip_dir, bert_dir = directory / "clip", directory / "bert"
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(clip_dir))
    write_chinese_tokenizer(bert_dir)
    return clip_dir, bert_dir


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers once joined)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def time_epoch(
    dataset: Dataset, collate_fn, batch_size: int, workers: int, to_model_inputs=lambda batch: batch
) -> dict[str, float]:
    """Images/s and CPU ms per image for one epoch on fresh workers, batches as training draws them
    and turns them into model inputs."""
    context = "fork" if workers else None  # as the Trainer's workers on Linux
    loader = DataLoader(
        dataset, batch_size, num_workers=workers, collate_fn=collate_fn, multiprocessing_context=context
    )
    images = 0
    cpu_before, started = cpu_seconds(), time.perf_counter()
    for batch in loader:
        images += len(to_model_inputs(batch)["pixel_values"])
    seconds = time.perf_counter() - started  # the exhausted loader has joined its workers
    cpu_ms = (cpu_seconds() - cpu_before) * 1000 / images
    return {"images_per_s": images / seconds, "cpu_ms_per_image": cpu_ms}


def pixel_difference(ours: ImageTextDataset, per_item: PerItemProcessorDataset, count: int) -> dict:
    """Mean and 99th-percentile absolute difference of the pixel values over the first `count`
    images, in normalised units (one step of 8-bit colour is about 0.015)."""
    differences = []
    for index in range(min(count, len(ours))):
        our_pixels = ours.transform.to_pixel_values([ours[index]["image"]])[0]
        differences.append((our_pixels - per_item[index]["pixel_values"]).abs().flatten().numpy())
    differences = np.concatenate(differences)
    return {
        "mean_abs": round(float(differences.mean()), 4),
        "p99_abs": round(float(np.percentile(differences, 99)), 4),
    }


def build_pipelines(photos: list[Path], workdir: Path, image_size: int, max_seq_length: int):
    """This project's dataset and collator, and the per-item dataset, over the same CSV rows."""
    clip_dir, bert_dir = write_processor_sources(workdir, image_size)
    csv_path = write_image_text_csv(workdir / "train.csv", photos)
    processor = build_processor(clip_dir, bert_dir)
    transform = ImageTransform.from_processor(processor)
    ours = ImageTextDataset(read_image_text_csv(csv_path), photos[0].parent, transform, draft=True)
    per_item = run_clip_dataset(
        csv_path, photos[0].parent, run_clip_processor(clip_dir, bert_dir), max_seq_length
    )
    return ours, ImageTextCollator(processor, transform, max_seq_length), per_item


def median_figures(runs: list[dict[str, float]]) -> dict[str, object]:
    return {
        "images_per_s": round(statistics.median(run["images_per_s"] for run in runs), 1),
        "cpu_ms_per_image": round(statistics.median(run["cpu_ms_per_image"] for run in runs), 2),
        "rounds_images_per_s": [round(run["images_per_s"], 1) for run in runs],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 small synthetic images, one round")
    parser.add_argument("--images", type=int, default=1000, help="number of web-size JPEGs")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers")
    parser.add_argument("--rounds", type=int, default=2, help="epochs of each pipeline, alternating")
    parser.add_argument("--image_size", type=int, default=224, help="the image tower's input size")
    parser.add_argument("--photo_root", default=str(PHOTO_ROOT), help="where the photo sets are made once")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Make (or reuse) the photos, time both pipelines in alternating rounds, print one JSON object."""
    args = parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.rounds = 24, 8, 1
    photos = benchmark_photos(args.images, args.quick, args.photo_root)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        ours, collator, per_item = build_pipelines(photos, Path(scratch), args.image_size, max_seq_length=64)
        runs: dict[str, list] = {"this_project": [], "per_item_processor": []}
        for _ in range(args.rounds):  # alternate, so that other load on the machine hits both alike
            runs["this_project"].append(
                time_epoch(
                    ours, collator, args.batch_size, args.workers, lambda b: collator.model_inputs(b)[0]
                )
            )
            runs["per_item_processor"].append(
                time_epoch(per_item, default_collate, args.batch_size, args.workers)
            )
        difference = pixel_difference(ours, per_item, count=8 if args.quick else 50)
    ours_figures, per_item_figures = (median_figures(runs[name]) for name in runs)
    figures = {
        "benchmark": "input_pipeline",
        "machine": machine(),
        "load_average_before": load_before,
        "photos": {**photo_summary(photos), "directory": str(photos[0].parent)},
        "settings": {key: getattr(args, key) for key in ("batch_size", "workers", "rounds", "image_size")},
        "this_project": ours_figures,
        "per_item_processor": per_item_figures,
        "speedup_images_per_s": round(ours_figures["images_per_s"] / per_item_figures["images_per_s"], 2),
        "speedup_cpu_time": round(per_item_figures["cpu_ms_per_image"] / ours_figures["cpu_ms_per_image"], 2),
        "pixel_value_difference": difference,
        "load_average_after": load_average(),
    }
    print(json.dumps(figures, indent=2, ensure_ascii=False), flush=True)
    return figures


if __name__ == "__main__":
    main()
