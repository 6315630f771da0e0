"""Benchmark the search service: text-search latency and queries/s under concurrent clients, the
FastAPI service (PyTorch and ONNX Runtime backends) beside the legacy http.server, in one run.

    python -m benchmarks.bench_service            # random ViT-B/16 + BERT-base, 10k-image index; JSON
    python -m benchmarks.bench_service --quick    # tiny towers, fewer requests: under a minute

Each server runs in a process of its own on 127.0.0.1 with the same index and model: the legacy
http.server (benchmarks/_legacy_server.py, what `retrieval.py serve` ran before, PyTorch only),
the service with `--backend torch`, and the service with `--backend onnx` (an export_onnx.py
export of the same model). The index holds synthetic clustered unit vectors (as in
bench_retrieval.py) under the model's fingerprint, so that the servers accept it; queries are
distinct Chinese sentences, so each one runs the text encoder. For 1, 8 and 32 concurrent clients
(threads of this process, each request on a new connection, as both servers support),
`--requests` queries are timed end to end: p50 and p99 latency in ms, and queries/s over the
whole batch; the servers take turns at each level, so that other load on the machine weighs on
all of them alike (the one-minute load average is recorded beside each row). The text and image
encoders are then timed alone, PyTorch eager against ONNX Runtime (bench_onnx.py's measurement).
Everything runs on the CPU, over loopback only.
"""

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from benchmarks._machine import load_average, machine
from benchmarks._towers import QUICK_TOWERS, VIT_B16_BERT_BASE
from benchmarks.bench_onnx import bench_encoders

SERVERS = ("legacy_http_server", "service_torch", "service_onnx")
CONCURRENCY = (1, 8, 32)
TOP_K = 10


# --- the index, the model and its export ---


def prepare(workdir: Path, quick: bool, vectors: int) -> tuple[Path, Path, object]:
    """A random model, a synthetic index of `vectors` rows under its fingerprint, its ONNX export."""
    from benchmarks.bench_onnx import build_model
    from benchmarks.bench_retrieval import write_synthetic_index
    from component.formats.onnx_export import export_onnx
    from component.processor import load_processor
    from component.retrieval.index import model_fingerprint
    from component.retrieval.store import read_info, write_info

    model = build_model(workdir, QUICK_TOWERS if quick else VIT_B16_BERT_BASE)
    model_dir = workdir / "model"
    processor = load_processor(model_dir)
    index_dir = workdir / "index"
    write_synthetic_index(index_dir, vectors, model.config.projection_dim, "exact")
    info = read_info(index_dir)
    info.model_name_or_path, info.model_fingerprint = str(model_dir), model_fingerprint(model, processor)
    write_info(index_dir, info)
    export_onnx(
        model, processor, workdir / "onnx", text_cases=[(1, 8)], image_batch_sizes=(1,), report=lambda _: None
    )
    return index_dir, workdir / "onnx", model


# --- one server in a process of its own ---


def serve_for_benchmark(kind: str, index_dir: Path, onnx_dir: Path) -> None:
    """Run one server (in the child process) and print its port."""
    from component.retrieval.index import RetrievalIndex

    index = RetrievalIndex.load(index_dir, device="cpu", memory_map=False)
    if kind == "legacy_http_server":
        from benchmarks._legacy_server import RetrievalServer

        index.load_model()
        server = RetrievalServer(index, "127.0.0.1", 0, log_requests=False, max_connections=256)
        print(f"PORT {server.server_address[1]}", flush=True)
        server.serve_forever()
        return
    from component.retrieval.server import ServiceLimits, search_server

    backend = "onnx" if kind == "service_onnx" else "torch"
    limits = ServiceLimits(max_connections=256)
    server = search_server(
        index, backend, onnx_dir if backend == "onnx" else None, log_requests=False, limits=limits
    )
    print(f"PORT {server.port}", flush=True)
    server.run()


def start_server(kind: str, index_dir: Path, onnx_dir: Path) -> tuple[subprocess.Popen, int]:
    """The server process and its port, once it listens."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_service",
        "--serve",
        kind,
        str(index_dir),
        str(onnx_dir),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    for line in process.stdout:
        if line.startswith("PORT "):
            return process, int(line.split()[1])
    raise RuntimeError(f"the {kind} server did not start (exit status {process.wait()})")


# --- load ---


def search_once(port: int, path: str) -> float:
    """Seconds for one search on a new connection; raises unless it is answered 200."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", path, headers={"Host": "localhost"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200 or not json.loads(body)["results"]:
        raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
    return time.perf_counter() - started


def run_load(port: int, parameter: str, clients: int, requests: int, offset: int) -> dict:
    """`requests` distinct text searches from `clients` threads: latency percentiles and queries/s."""
    paths = [
        f"/api/search?top_k={TOP_K}&{parameter}="
        + quote(f"一只在草地上奔跑的小狗，第{offset + number}张照片")
        for number in range(requests)
    ]
    latencies, errors, lock = [], [], threading.Lock()

    def client(first: int) -> None:
        for number in range(first, requests, clients):
            try:
                seconds = search_once(port, paths[number])
            except Exception as error:  # counted, and the figures say so
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client, args=(first,)) for first in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": requests,
        "errors": len(errors),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "latency_ms_p99": round(float(np.percentile(latencies, 99)) * 1000, 1),
        "queries_per_s": round(len(latencies) / wall, 1),
    }


def bench_servers(kinds, index_dir: Path, onnx_dir: Path, requests: int, concurrency) -> dict:
    """Start every server, warm each up, then load them in turn at each concurrency.

    The servers take turns at each level, rather than one after another, so that other work on
    the machine during the run weighs on all of them alike.
    """
    started = {}
    try:
        for kind in kinds:
            started[kind] = start_server(kind, index_dir, onnx_dir)
        parameters = {kind: "text" if kind == "legacy_http_server" else "q" for kind in kinds}
        for kind in kinds:
            run_load(started[kind][1], parameters[kind], 2, 6, offset=10**6)  # warm-up
        figures = {kind: [] for kind in kinds}
        for clients in concurrency:
            for kind in kinds:
                row = run_load(started[kind][1], parameters[kind], clients, requests, offset=clients * 10**4)
                figures[kind].append({**row, "load_average": load_average()})
        return figures
    finally:
        for process, _ in started.values():
            process.terminate()
            process.wait(30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny towers, 2,000 vectors, 24 requests")
    parser.add_argument("--requests", type=int, help="timed searches per concurrency (default 240; quick 24)")
    parser.add_argument("--vectors", type=int, help="images in the synthetic index (default 10,000)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="which to run")
    parser.add_argument("--no_encoders", action="store_true", help="skip the encoder timings")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Prepare the model, index and export, load each server, time the encoders; print JSON."""
    args = parse_args(argv)
    if args.serve:
        serve_for_benchmark(args.serve[0], Path(args.serve[1]), Path(args.serve[2]))
        return None
    import torch

    requests = args.requests or (24 if args.quick else 240)
    vectors = args.vectors or (2_000 if args.quick else 10_000)
    figures: dict[str, object] = {
        "machine": machine(),
        "quick": args.quick,
        "load_average_before": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_service_") as workdir:
        workdir = Path(workdir)
        index_dir, onnx_dir, model = prepare(workdir, args.quick, vectors)
        figures["index"] = {"vectors": vectors, "dim": model.config.projection_dim, "type": "exact"}
        figures["towers"] = (QUICK_TOWERS if args.quick else VIT_B16_BERT_BASE).__dict__
        figures["torch_threads"] = torch.get_num_threads()
        figures["text_search"] = bench_servers(args.servers, index_dir, onnx_dir, requests, CONCURRENCY)
        # On stderr now too, in case the encoder timings that follow are cut short.
        print(json.dumps({"text_search": figures["text_search"]}), file=sys.stderr, flush=True)
        if not args.no_encoders:
            figures["encoding"] = bench_encoders(model, workdir, args.quick)
    figures["load_average_after"] = load_average()
    print(json.dumps(figures, indent=2, ensure_ascii=False), flush=True)
    return figures


if __name__ == "__main__":
    main()
