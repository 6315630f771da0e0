"""Benchmark retrieval: images/s indexed, query latency at 10k and 1M vectors, memory per million vectors.

    python benchmarks/bench_retrieval.py            # base-size model, 1M synthetic vectors; prints JSON
    python benchmarks/bench_retrieval.py --quick    # tiny model, 10k vectors: a few seconds

Indexing runs `RetrievalIndex.build` end to end (decode, encode, write) on generated 640x480 JPEG
photos, with a random model the size of ViT-B/16 + BERT-base (speed does not depend on the values
of the weights), on the CPU and, when there is one, on a GPU (bf16).

Query latency is one query at a time through `RetrievalIndex.search_embedding` (faiss plus the
metadata lookup), median and 95th percentile, on synthetic clustered unit vectors of 512 dims:
real embeddings cluster too, and on uniformly random vectors an IVF index's recall means nothing.
Each index is loaded in a fresh process, whose resident memory growth (after loading and running
the queries) gives the memory per million vectors. The approximate (IVF) index reports its
recall@10 against the exact one.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUICK_VECTOR_COUNTS = (2_000, 10_000)
FULL_VECTOR_COUNTS = (10_000, 1_000_000)


# --- models and photos ---


def write_model(directory: Path, quick: bool) -> Path:
    """A random BertCLIP checkpoint: tiny (quick), or ViT-B/16 + BERT-base with projection 512."""
    import torch
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from component.testing.tiny import (
        write_bert_clip,
        write_chinese_tokenizer,
        write_tiny_bert,
        write_tiny_clip,
    )

    if (directory / "model" / "config.json").is_file():
        return directory / "model"
    torch.manual_seed(0)
    if quick:
        clip, bert = write_tiny_clip(directory / "clip"), write_tiny_bert(directory / "bert")
    else:
        clip, bert = directory / "clip", directory / "bert"
        vision = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12)
        vision.update(num_attention_heads=12, intermediate_size=3072)
        text = dict(hidden_size=512, num_hidden_layers=1, num_attention_heads=8, intermediate_size=2048)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(
            clip
        )
        CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ).save_pretrained(clip)
        tokenizer = write_chinese_tokenizer(bert)
        BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512)).save_pretrained(bert)
    return write_bert_clip(directory / "model", clip, bert)


def make_photos(directory: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`count` distinct JPEGs: smooth colour fields with grain, so that they compress like photos."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    if len(list(directory.glob("*.jpg"))) == count:
        return directory
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    for number in range(count):
        phases = rng.uniform(0, 2 * np.pi, 3)
        frequency = rng.uniform(1, 6)
        channels = [np.sin(frequency * (x + y * (c + 1)) * np.pi + phases[c]) for c in range(3)]
        array = (np.stack(channels, axis=-1) + 1) * 110 + rng.normal(0, 6, (height, width, 3))
        Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(directory / f"{number:05d}.jpg", quality=90)
    return directory


# --- indexing speed ---


def measure_indexing(model_path: Path, photos: Path, output: Path, device: str, batch_size: int) -> dict:
    """Images/s of building an index of `photos` from scratch, end to end (the model loading, timed
    apart too, included), and the seconds of a re-run that finds nothing new."""
    import shutil

    from component.encoding import load_model_and_processor
    from component.retrieval.images import images_in_directory
    from component.retrieval.index import RetrievalIndex, model_fingerprint

    source = images_in_directory(photos)
    warm_up = images_in_directory(photos)
    warm_up.filenames = warm_up.filenames[:batch_size]
    shutil.rmtree(output, ignore_errors=True)
    RetrievalIndex.build(model_path, output, warm_up, batch_size=batch_size, device=device)
    shutil.rmtree(output)
    started = time.perf_counter()
    model, processor = load_model_and_processor(model_path, device)
    model_fingerprint(model, processor)
    load_seconds = time.perf_counter() - started
    del model, processor
    started = time.perf_counter()
    index = RetrievalIndex.build(model_path, output, source, batch_size=batch_size, device=device)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    RetrievalIndex.build(model_path, output, source, batch_size=batch_size, device=device)
    rerun_seconds = time.perf_counter() - started
    return {
        "device": device,
        "images": len(index),
        "batch_size": batch_size,
        "images_per_s": round(len(index) / build_seconds, 1),
        "build_seconds": round(build_seconds, 2),
        "model_loading_seconds": round(load_seconds, 2),
        "rerun_with_nothing_new_seconds": round(rerun_seconds, 2),
    }


def measure_text_encoding(model_path: Path, texts: int = 30) -> float:
    """Median milliseconds to encode one short Chinese query on the CPU."""
    from component.encoding import encode_texts, load_model_and_processor

    model, processor = load_model_and_processor(model_path, "cpu")
    encode_texts(model, processor, ["预热"])
    timings = []
    for number in range(texts):
        started = time.perf_counter()
        encode_texts(model, processor, [f"一只在草地上奔跑的小狗，第{number}张照片"])
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 2)


# --- synthetic vector indexes ---


def clustered_unit_vectors(
    count: int, dim: int, seed: int, clusters: int = 2_000, noise: float = 1.0
) -> np.ndarray:
    """float32 [count, dim] unit vectors around random centres: cosine to the centre about 0.7 with
    noise 1, about 0.45 with noise 2 (queries: like text queries, farther from the images they find)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = noise / np.sqrt(dim)
    vectors = (
        centres[rng.integers(0, clusters, count)] + rng.standard_normal((count, dim), np.float32) * spread
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_synthetic_index(directory: Path, count: int, dim: int, index_type: str) -> dict:
    """An index directory of `count` synthetic vectors written by the indexer's own functions; the
    seconds it took to build the faiss index. Reused when it already exists."""
    import pandas as pd

    from component.retrieval.index import write_data_files
    from component.retrieval.store import IndexInfo, read_info, write_info

    if read_info(directory) is not None:
        return {"build_seconds": read_info(directory).last_run.get("build_seconds")}
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / ".synthetic.tmp"
    with open(raw, "wb") as file:
        for start in range(0, count, 100_000):
            rows = min(100_000, count - start)
            file.write(clustered_unit_vectors(rows, dim, seed=start).astype(np.float16).tobytes())
    info = IndexInfo("synthetic", "0" * 64, str(directory), dim, "float16", index_type, count, generation=1)
    metadata = pd.DataFrame({"filename": [f"images/{row:07d}.jpg" for row in range(count)]})
    started = time.perf_counter()
    empty = np.empty((0, dim), np.float16)
    write_data_files(directory, info, None, empty, np.empty(0, np.int64), raw, metadata)
    info.last_run = {"build_seconds": round(time.perf_counter() - started, 2)}
    write_info(directory, info)
    raw.unlink()
    return {"build_seconds": info.last_run["build_seconds"]}


def resident_mb() -> dict[str, float]:
    """This process's resident memory in MiB: anonymous (its own) and file-backed (mapped files)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {kind: int(fields[f"Rss{kind.capitalize()}"].split()[0]) / 1024 for kind in ("anon", "file")}


def measure_queries(directory: Path, queries: Path, faiss_threads: int = 0) -> dict:
    """Load the index as the server does, run each query; memory growth, latency, the top 10s.

    Run in a fresh process for the memory figures. `faiss_threads` (0: faiss's default) sets the
    OpenMP threads of faiss for the whole process.
    """
    import faiss

    from component.retrieval.index import RetrievalIndex

    if faiss_threads:
        faiss.omp_set_num_threads(faiss_threads)

    query_vectors = np.load(queries)
    before = resident_mb()
    started = time.perf_counter()
    index = RetrievalIndex.load(directory, memory_map=False)  # as the server loads it
    load_ms = (time.perf_counter() - started) * 1000
    index.search_embedding(query_vectors[0], top_k=10)  # warm-up
    timings, top = [], []
    for query in query_vectors:
        started = time.perf_counter()
        results = index.search_embedding(query, top_k=10)
        timings.append(time.perf_counter() - started)
        top.append([result.filename for result in results])
    return {
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_ms": round(load_ms, 1),
        "latency_ms_median": round(statistics.median(timings) * 1000, 3),
        "latency_ms_p95": round(float(np.percentile(timings, 95)) * 1000, 3),
        "resident_mb_growth": {kind: round(mb - before[kind], 1) for kind, mb in resident_mb().items()},
        "top_10": top,
    }


def measure_in_subprocess(directory: Path, queries: Path, faiss_threads: int) -> dict:
    """`measure_queries` in a fresh process, so that its memory growth is the index's alone."""
    command = [sys.executable, __file__, "--measure", str(directory), str(queries)]
    command += ["--faiss_threads", str(faiss_threads)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def query_latency(
    workdir: Path, counts: tuple[int, ...], dim: int, queries: int, quick: bool, faiss_threads: int
) -> list[dict]:
    """Per vector count and index type: build seconds, latency, memory, size on disk, IVF recall@10.

    Quick mode measures in this process (its memory figures then mean little), skipping the
    start of a process that imports torch and transformers.
    """
    query_file = workdir / "queries.npy"
    np.save(query_file, clustered_unit_vectors(queries, dim, seed=987_654_321, noise=2.0))
    rows = []
    for count in counts:
        exact_top = None
        for index_type in ("exact", "approximate"):
            directory = workdir / f"vectors_{count}_{dim}_{index_type}"
            row = {"vectors": count, "dim": dim, "index_type": index_type}
            row.update(write_synthetic_index(directory, count, dim, index_type))
            measure = measure_queries if quick else measure_in_subprocess
            measured = measure(directory, query_file, faiss_threads)
            top = measured.pop("top_10")
            row.update(measured)
            if index_type == "exact":
                exact_top = top
            else:
                hits = [len(set(found) & set(truth)) for found, truth in zip(top, exact_top, strict=True)]
                row["recall_at_10_vs_exact"] = round(sum(hits) / (10 * len(hits)), 3)
            sizes = {path.suffix: path.stat().st_size for path in directory.iterdir()}
            row["disk_mb"] = {kind: round(sizes[suffix] / 2**20, 1) for kind, suffix in _FILES.items()}
            rows.append(row)
    return rows


_FILES = {"embeddings": ".npy", "vectors": ".faiss", "metadata": ".csv"}


def per_million(rows: list[dict]) -> dict:
    """Memory and disk per million vectors, from the largest synthetic indexes."""
    largest = max(row["vectors"] for row in rows)
    figures = {}
    for row in rows:
        if row["vectors"] == largest:
            scale = 1_000_000 / largest
            figures[row["index_type"]] = {
                "resident_mb": {kind: round(mb * scale) for kind, mb in row["resident_mb_growth"].items()},
                "disk_mb": {kind: round(size * scale) for kind, size in row["disk_mb"].items()},
            }
    return figures


def machine() -> dict[str, object]:
    """The machine and versions of `benchmarks._machine.machine`, plus faiss's."""
    import faiss

    from benchmarks._machine import machine as base_machine

    return {**base_machine(), "faiss": faiss.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 12 images, 10k vectors: a smoke run"
    )
    parser.add_argument(
        "--images", type=int, default=96, help="photos indexed (full mode; 0: no indexing figures)"
    )
    parser.add_argument(
        "--faiss_threads", type=int, default=0, help="OpenMP threads for faiss queries (0: its default)"
    )
    parser.add_argument("--queries", type=int, default=100, help="queries per vector index")
    parser.add_argument(
        "--workdir", default=str(REPO / "output" / "bench_retrieval"), help="models, photos, indexes"
    )
    parser.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Index photos, then time queries on synthetic indexes; print one JSON object."""
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_queries(Path(args.measure[0]), Path(args.measure[1]), args.faiss_threads)))
        return 0
    import torch

    workdir = Path(args.workdir) / ("quick" if args.quick else "full")
    model = write_model(workdir, args.quick)
    photos = make_photos(workdir / "photos", 12 if args.quick else args.images, (640, 480))
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if not (args.quick or args.images):
        devices = []  # no indexing figures
    figures: dict[str, object] = {
        "machine": machine(),
        "quick": args.quick,
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    figures["indexing"] = {
        device: measure_indexing(
            model, photos, workdir / f"index_{device}", device, 16 if device == "cpu" else 256
        )
        for device in devices
    }
    figures["text_query_encoding_ms_cpu"] = measure_text_encoding(model, 5 if args.quick else 30)
    counts, dim = (QUICK_VECTOR_COUNTS, 64) if args.quick else (FULL_VECTOR_COUNTS, 512)
    rows = query_latency(
        workdir, counts, dim, 20 if args.quick else args.queries, args.quick, args.faiss_threads
    )
    figures["query_latency"] = rows
    figures["per_million_vectors"] = per_million(rows)
    figures["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
