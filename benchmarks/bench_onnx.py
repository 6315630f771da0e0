"""Benchmark the ONNX export: encoding latency and throughput, PyTorch eager against ONNX Runtime (CPU).

    python -m benchmarks.bench_onnx            # random ViT-B/16 + BERT-base towers; prints JSON
    python -m benchmarks.bench_onnx --quick    # tiny towers: a few seconds

Both encoders (projected features plus L2-normalised embeddings, as export_onnx.py writes them)
are timed at batch 1 (latency: median milliseconds per call) and batch 64 (throughput: inputs per
second), texts at 32 tokens (a caption of about 30 Chinese characters). PyTorch runs in eval and
inference mode with its default threads; ONNX Runtime with its default session options on the
CPU provider. The float32 graphs' max abs difference from PyTorch on the timed inputs, and the
float16 graphs' min cosine with PyTorch's float32 embeddings (at batch 3), are reported too.
The weights are random: speed does not depend on their values.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks._machine import load_average, machine
from benchmarks._towers import QUICK_TOWERS, VIT_B16_BERT_BASE, Towers, write_towers

TEXT_LENGTH = 32


def build_model(directory: Path, towers: Towers):
    """A random BertCLIP model of `towers`' sizes, in eval mode on the CPU."""
    from component.model import BertCLIPModel
    from component.testing.tiny import write_bert_clip

    clip_dir, bert_dir = write_towers(directory, towers)
    return BertCLIPModel.from_pretrained(write_bert_clip(directory / "model", clip_dir, bert_dir)).eval()


def median_seconds(call: Callable[[], object], repeats: int, warmup: int) -> float:
    """The median wall time of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_torch(encoder, inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> tuple[float, list]:
    """PyTorch's median seconds per call on `inputs`, and its outputs as arrays."""
    with torch.inference_mode():
        seconds = median_seconds(lambda: encoder(**inputs), repeats, warmup)
        return seconds, [tensor.numpy() for tensor in encoder(**inputs)]


def time_onnx(session, inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> tuple[float, list]:
    """ONNX Runtime's median seconds per call on `inputs`, and its outputs."""
    arrays = {name: tensor.numpy() for name, tensor in inputs.items()}
    return median_seconds(lambda: session.run(None, arrays), repeats, warmup), session.run(None, arrays)


def float16_cosine(encoder, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Min cosine of the float16 graph's embeddings with PyTorch's float32 ones."""
    from component.formats.onnx_export import convert_to_float16
    from component.formats.onnx_parity import onnx_session

    convert_to_float16(path)
    outputs = onnx_session(path).run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.inference_mode():
        expected = encoder(**inputs)[1].numpy()
    return float((outputs[1].astype(np.float64) * expected).sum(axis=-1).min())


def bench_encoder(
    encoder, export: Callable[[Path], object], batches: Callable[[int], dict], path: Path, quick: bool
):
    """Export one encoder to `path`, time batch 1 and batch 64 and measure float16 parity.

    PyTorch is timed before the ONNX Runtime session exists: the session's threads spin after
    each run and would slow PyTorch down on a small machine.
    """
    import onnxruntime

    start = time.perf_counter()
    export(path)
    export_s = time.perf_counter() - start
    plans = {"batch_1": (batches(1), 10 if quick else 20, 2), "batch_64": (batches(64), 3, 1)}
    torch_runs = {name: time_torch(encoder, *plan) for name, plan in plans.items()}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_runs = {name: time_onnx(session, *plan) for name, plan in plans.items()}
    del session  # its threads stop before the next encoder is timed
    diff = max(
        float(np.abs(got - want).max())
        for name in plans
        for got, want in zip(onnx_runs[name][1], torch_runs[name][1], strict=True)
    )
    return {
        "export_s": round(export_s, 1),
        "onnx_mb": round(path.stat().st_size / 2**20, 1),
        "batch_1_latency_ms": {
            "torch": round(torch_runs["batch_1"][0] * 1000, 2),
            "onnxruntime": round(onnx_runs["batch_1"][0] * 1000, 2),
        },
        "batch_64_per_s": {
            "torch": round(64 / torch_runs["batch_64"][0], 1),
            "onnxruntime": round(64 / onnx_runs["batch_64"][0], 1),
        },
        "float32_max_abs_diff": diff,
        "float16_min_cosine": round(float16_cosine(encoder, path, batches(3)), 6),
    }


def bench_encoders(model, workdir: Path, quick: bool) -> dict:
    """Text and image encoders of `model`, PyTorch eager against ONNX Runtime, exported into `workdir`."""
    from component.formats.onnx_export import (
        ImageEncoder,
        TextEncoder,
        export_image_encoder,
        export_text_encoder,
    )
    from component.formats.onnx_parity import image_batches, text_batches

    length = min(TEXT_LENGTH, model.config.text_config.max_position_embeddings)
    text = bench_encoder(
        TextEncoder(model).eval(),
        lambda path: export_text_encoder(model, path),
        lambda batch_size: next(text_batches(model, [(batch_size, length)]))[1],
        workdir / "bench_text_encoder.onnx",
        quick,
    )
    image = bench_encoder(
        ImageEncoder(model).eval(),
        lambda path: export_image_encoder(model, path),
        lambda batch_size: next(image_batches(model, [batch_size]))[1],
        workdir / "bench_image_encoder.onnx",
        quick,
    )
    return {"text_length": length, "text_encoder": text, "image_encoder": image}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny towers, fewer repeats")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Build the model, export and time both encoders, print and return the figures."""
    args = parse_args(argv)
    towers = QUICK_TOWERS if args.quick else VIT_B16_BERT_BASE
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as workdir:
        workdir = Path(workdir)
        encoders = bench_encoders(build_model(workdir, towers), workdir, args.quick)
    figures = {
        "machine": machine(),
        "towers": towers.__dict__,
        "torch_threads": torch.get_num_threads(),
        "text_length": encoders["text_length"],
        "load_average_before": load_before,
        "text_encoder": encoders["text_encoder"],
        "image_encoder": encoders["image_encoder"],
        "load_average_after": load_average(),
    }
    print(json.dumps(figures, indent=2), flush=True)
    return figures


if __name__ == "__main__":
    main()
