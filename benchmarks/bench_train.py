"""Benchmark training throughput through the entry point that train_clip.py runs.

    python -m benchmarks.bench_train                 # CPU parts; the GPU part too when CUDA is present
    python -m benchmarks.bench_train --quick         # tiny towers and data: a smoke run
    python -m benchmarks.bench_train --parts gpu     # one part

It prints one JSON object with a key for each part:

- lit_cache: 5 LiT epochs with `cache_image_features` true and false, with an image tower much
  larger than the text tower: wall time of each whole run, samples/s of epochs 2-5, train_loss.
- run_clip: samples/s of this project and of the Hugging Face run_clip recipe with the same
  towers, rows, batch, workers and steps, both LiT, on full-size web JPEGs.
- gpu: ViT-B/16 + BERT-base at sequence length 64 in bf16 (random weights built from configs),
  LiT with cached image features, LiT, and full training: samples/s, peak memory and
  model-FLOPs utilisation. Without a CUDA device it is skipped with a note.

"This project" is `component.training.run.run_training` on an arg file written here. samples/s
counts the optimizer steps after a warm-up. The CPU parts run on the CPU even beside a GPU.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import TrainerCallback, TrainingArguments

from benchmarks._machine import load_average, machine, torch_threads
from benchmarks._photos import PHOTO_ROOT, benchmark_photos, make_photos, photo_summary, write_image_text_csv
from benchmarks._run_clip import run_clip_dataset, run_clip_processor, train_run_clip
from benchmarks._towers import (
    IMAGE_HEAVY_TOWERS,
    QUICK_TOWERS,
    SMALL_TOWERS,
    VIT_B16_BERT_BASE,
    Towers,
    peak_bf16_flops,
    training_flops_per_sample,
    write_towers,
)
from component.training.arguments import parse_train_args
from component.training.run import run_training

MAX_SEQ_LENGTH = 64
LIT_EPOCHS = 5
GPU_BATCH_SIZES = {"lit_cached": 1024, "lit": 512, "full": 256}


class StepTimer(TrainerCallback):
    """Wall time from the end of optimizer step `warmup_steps` to the end of the last step."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.started: float | None = None
        self.ended: float | None = None
        self.timed_steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are queued, not yet done
        if state.global_step == self.warmup_steps:
            self.started = time.perf_counter()
        elif state.global_step > self.warmup_steps:
            self.ended, self.timed_steps = time.perf_counter(), state.global_step - self.warmup_steps

    def samples_per_s(self, batch_size: int) -> float | None:
        if not self.timed_steps:
            return None
        return round(self.timed_steps * batch_size / (self.ended - self.started), 2)


class Workspace(NamedTuple):
    """Where a part's towers, training CSV and images are."""

    towers_dir: Path
    csv_path: Path
    image_dir: Path


def prepare(directory: Path, towers: Towers, photos: list[Path], min_chars: int = 0) -> Workspace:
    """Random towers in `directory`/towers and a train.csv over `photos`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_towers(directory / "towers", towers)
    csv_path = write_image_text_csv(directory / "train.csv", photos, min_chars)
    return Workspace(directory / "towers", csv_path, photos[0].parent)


def project_settings(workspace: Workspace, output_dir: Path, batch_size: int, **values) -> dict:
    """Arg-file values for a LiT run in `workspace`; `values` add to and override them."""
    return {
        "output_dir": str(output_dir),
        "clip_pretrain_path": str(workspace.towers_dir / "clip"),
        "bert_pretrain_path": str(workspace.towers_dir / "bert"),
        "train_file": str(workspace.csv_path),
        "image_path": str(workspace.image_dir),
        "max_seq_length": MAX_SEQ_LENGTH,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,  # also the batch that fills the feature cache
        "learning_rate": 1e-4,
        "logging_steps": 10,
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        **values,
    }


def timed(metrics: dict, started: float, timer: StepTimer, batch_size: int) -> dict:
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "train_runtime_s": round(metrics["train_runtime"], 2),
        "samples_per_s": timer.samples_per_s(batch_size),
        "train_loss": metrics["train_loss"],
    }


def run_project(settings: dict, warmup_steps: int) -> dict:
    """train_clip.py's run on an arg file of `settings`: wall time, samples/s after the warm-up, loss."""
    arg_file = Path(settings["output_dir"]).with_suffix(".json")
    arg_file.parent.mkdir(parents=True, exist_ok=True)
    arg_file.write_text(json.dumps(settings, ensure_ascii=False))
    timer, started = StepTimer(warmup_steps), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON figures
        metrics = run_training(*parse_train_args(arg_file), extra_callbacks=(timer,))
    return timed(metrics, started, timer, settings["per_device_train_batch_size"])


def run_peer(
    workspace: Workspace,
    projection_dim: int,
    output_dir: Path,
    batch_size: int,
    workers: int,
    max_steps: int,
    warmup_steps: int,
) -> dict:
    """The run_clip recipe with the same towers, rows and Trainer settings as `run_project`."""
    clip_dir, bert_dir = workspace.towers_dir / "clip", workspace.towers_dir / "bert"
    processor = run_clip_processor(clip_dir, bert_dir)
    dataset = run_clip_dataset(workspace.csv_path, workspace.image_dir, processor, MAX_SEQ_LENGTH)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    timer, started = StepTimer(warmup_steps), time.perf_counter()
    metrics = train_run_clip(clip_dir, bert_dir, dataset, args, projection_dim, [timer])
    return timed(metrics, started, timer, batch_size)


def lit_cache_part(
    photos: list[Path], directory: Path, towers: Towers, batch_size: int, workers: int
) -> dict:
    """5 LiT epochs with and without cached image features: wall time, samples/s and loss."""
    workspace = prepare(directory, towers, photos)
    steps_per_epoch = math.ceil(len(photos) / batch_size)
    runs = {}
    for name, cached in (("uncached", False), ("cached", True)):
        settings = project_settings(
            workspace,
            directory / name,
            batch_size,
            num_train_epochs=LIT_EPOCHS,
            cache_image_features=cached,
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,  # as train_args/train_clip.json
        )
        runs[name] = run_project(settings, warmup_steps=steps_per_epoch)  # times epochs 2-5
    uncached, cached = runs["uncached"], runs["cached"]
    loss_difference = abs(cached["train_loss"] - uncached["train_loss"]) / abs(uncached["train_loss"])
    return {
        "towers": asdict(towers),
        "samples": len(photos),
        "epochs": LIT_EPOCHS,
        "batch_size": batch_size,
        "workers": workers,
        "uncached": uncached,
        "cached": cached,
        "cached_over_uncached_wall": round(cached["wall_s"] / uncached["wall_s"], 3),
        "train_loss_relative_difference": float(f"{loss_difference:.3g}"),
    }


def run_clip_part(
    photos: list[Path],
    directory: Path,
    towers: Towers,
    batch_size: int,
    workers: int,
    warmup_steps: int,
    timed_steps: int,
) -> dict:
    """samples/s of this project and of the run_clip recipe: same towers, rows, batch and workers."""
    workspace = prepare(directory, towers, photos)
    max_steps = warmup_steps + timed_steps
    settings = project_settings(
        workspace, directory / "this_project", batch_size, max_steps=max_steps, dataloader_num_workers=workers
    )
    ours = run_project(settings, warmup_steps)
    peer = run_peer(
        workspace, towers.projection_dim, directory / "run_clip", batch_size, workers, max_steps, warmup_steps
    )
    return {
        "towers": asdict(towers),
        "batch_size": batch_size,
        "workers": workers,
        "warmup_steps": warmup_steps,
        "timed_steps": timed_steps,
        "this_project": ours,
        "run_clip": peer,
        "speedup_samples_per_s": round(ours["samples_per_s"] / peer["samples_per_s"], 2),
    }


def model_throughput(
    photos: list[Path],
    directory: Path,
    towers: Towers,
    batch_sizes: dict[str, int],
    workers: int,
    warmup_steps: int,
    timed_steps: int,
    bf16: bool,
) -> dict:
    """samples/s, peak memory and MFU of LiT with cached features, LiT and full training, on
    the CUDA device when there is one (else the CPU, as the tests run it)."""
    cuda = torch.cuda.is_available()
    workspace = prepare(directory, towers, photos, min_chars=MAX_SEQ_LENGTH)  # every text fills 64 tokens
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if cuda and bf16 else None
    figures = {
        "towers": asdict(towers),
        "seq_length": MAX_SEQ_LENGTH,
        "precision": "bf16" if bf16 else "fp32",
        "peak_flops_assumed": peak,
        "workers": workers,
        "timed_steps": timed_steps,
    }
    for mode, batch_size in batch_sizes.items():
        lit = mode != "full"
        settings = project_settings(
            workspace,
            directory / mode,
            batch_size,
            max_steps=warmup_steps + timed_steps,
            freeze_vision_model=lit,
            freeze_vision_projection=lit,
            cache_image_features=mode == "lit_cached",
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
            dataloader_pin_memory=cuda,
            use_cpu=not cuda,
            bf16=bf16,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
        )
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run = run_project(settings, warmup_steps)
        flops = training_flops_per_sample(towers, MAX_SEQ_LENGTH, mode)
        figures[mode] = {
            "batch_size": batch_size,
            **run,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "model_gflops_per_sample": float(f"{flops / 1e9:.4g}"),
            "mfu": round(run["samples_per_s"] * flops / peak, 3) if peak and run["samples_per_s"] else None,
        }
    return figures


def gpu_part(directory: Path, args: argparse.Namespace) -> dict:
    """ViT-B/16 + BERT-base in bf16 on the CUDA device; a note instead when there is none."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    batch_sizes = {mode: args.gpu_batch_size or size for mode, size in GPU_BATCH_SIZES.items()}
    count = max(batch_sizes.values()) * (args.gpu_warmup_steps + args.gpu_timed_steps)
    # As download_image.py stores images: short side 256 or a little more. One epoch covers the run.
    photos = make_photos(Path(args.photo_root) / f"stored_{count}", count, (256, 384))
    return model_throughput(
        photos,
        directory,
        VIT_B16_BERT_BASE,
        batch_sizes,
        args.gpu_workers,
        args.gpu_warmup_steps,
        args.gpu_timed_steps,
        bf16=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny towers, 24 small images: a smoke run")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("lit_cache", "run_clip", "gpu"),
        default=["lit_cache", "run_clip", "gpu"],
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (CPU)")
    parser.add_argument(
        "--torch_threads",
        type=int,
        default=None,
        help="intra-op threads of the training process (default: the cores the workers leave, at least 1)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="batch of the CPU parts")
    parser.add_argument("--lit_rows", type=int, default=256, help="rows of the 5-epoch LiT runs")
    parser.add_argument(
        "--gpu_batch_size",
        type=int,
        default=None,
        help=f"batch of every GPU mode (default: {GPU_BATCH_SIZES})",
    )
    parser.add_argument("--gpu_workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--gpu_warmup_steps", type=int, default=5)
    parser.add_argument("--gpu_timed_steps", type=int, default=20)
    parser.add_argument("--photo_root", default=str(PHOTO_ROOT), help="where the photo sets are made once")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts on fresh towers in a temporary directory; print one JSON object."""
    args = parse_args(argv)
    quick = args.quick
    workers, batch_size = (0, 4) if quick else (args.workers, args.batch_size)
    # Intra-op threads beyond the cores the workers leave stall at every op (tiny models: one).
    threads = args.torch_threads or (1 if quick else max(1, (os.cpu_count() or 1) - workers))
    figures: dict[str, object] = {
        "benchmark": "training",
        "machine": machine(),
        "torch_threads": threads,
        "load_average_before": load_average(),
    }
    with torch_threads(threads), tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if {"lit_cache", "run_clip"} & set(args.parts):
            photos = benchmark_photos(24 if quick else 1000, quick, args.photo_root)
            figures["photos"] = photo_summary(photos)
        if "lit_cache" in args.parts:
            towers = QUICK_TOWERS if quick else IMAGE_HEAVY_TOWERS
            lit_photos = photos[: len(photos) if quick else args.lit_rows]
            figures["lit_cache"] = lit_cache_part(
                lit_photos, scratch / "lit_cache", towers, batch_size, workers
            )
        if "run_clip" in args.parts:
            towers = QUICK_TOWERS if quick else SMALL_TOWERS
            warmup_steps, timed_steps = (1, 2) if quick else (3, 20)
            figures["run_clip"] = run_clip_part(
                photos, scratch / "run_clip", towers, batch_size, workers, warmup_steps, timed_steps
            )
        if "gpu" in args.parts:
            figures["gpu"] = gpu_part(scratch / "gpu", args)
    figures["load_average_after"] = load_average()
    print(json.dumps(figures, indent=2, ensure_ascii=False), flush=True)
    return figures


if __name__ == "__main__":
    main()
