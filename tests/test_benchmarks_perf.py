"""The input and training benchmarks in quick mode, so that they never rot: each runs end to end
and prints one JSON object of the documented shape. Timings are not checked."""

import json

import pytest
import torch
from PIL import Image

from benchmarks import bench_input, bench_train
from benchmarks._machine import torch_threads
from benchmarks._photos import benchmark_photos, caption, make_photos
from benchmarks._towers import QUICK_TOWERS, VIT_B16_BERT_BASE, training_flops_per_sample

MACHINE_KEYS = {"cpu", "cores", "gpu", "python", "torch", "transformers", "pillow"}
RUN_KEYS = {"wall_s", "train_runtime_s", "samples_per_s", "train_loss"}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other work shares the cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_photos")


def test_photos_are_distinct_jpegs_within_the_sides_and_reused(tmp_path):
    photos = make_photos(tmp_path, 6, sides=(100, 140), synthetic=True, workers=2)
    assert len({photo.read_bytes() for photo in photos}) == 6
    for photo in photos:
        with Image.open(photo) as image:
            assert image.format == "JPEG" and all(100 <= side <= 140 for side in image.size)
    stamps = [photo.stat().st_mtime_ns for photo in photos]
    assert make_photos(tmp_path, 6, sides=(100, 140), synthetic=True) == photos
    assert [photo.stat().st_mtime_ns for photo in photos] == stamps  # not written again
    assert caption(0) != caption(1) and len(caption(2, min_chars=64)) >= 64


def test_input_benchmark_quick_mode_prints_its_figures(photo_root, capsys):
    figures = bench_input.main(["--quick", "--photo_root", str(photo_root)])
    assert json.loads(capsys.readouterr().out) == figures
    assert set(figures["machine"]) == MACHINE_KEYS
    assert figures["photos"]["count"] == 24
    for pipeline in ("this_project", "per_item_processor"):
        assert figures[pipeline]["images_per_s"] > 0
        assert figures[pipeline]["cpu_ms_per_image"] > 0
    assert figures["speedup_images_per_s"] > 0 and figures["speedup_cpu_time"] > 0
    assert 0 <= figures["pixel_value_difference"]["mean_abs"] < 0.05


def test_train_benchmark_quick_mode_prints_its_figures(photo_root, capsys):
    threads = torch.get_num_threads()
    figures = bench_train.main(["--quick", "--photo_root", str(photo_root)])
    assert json.loads(capsys.readouterr().out) == figures
    assert set(figures["machine"]) == MACHINE_KEYS
    assert figures["torch_threads"] == 1 and torch.get_num_threads() == threads  # restored
    lit = figures["lit_cache"]
    assert set(lit["uncached"]) == set(lit["cached"]) == RUN_KEYS
    assert lit["cached"]["samples_per_s"] > 0 and lit["cached_over_uncached_wall"] > 0
    assert lit["train_loss_relative_difference"] < 0.01  # the cache must not change what is learned
    run_clip = figures["run_clip"]
    assert set(run_clip["this_project"]) == set(run_clip["run_clip"]) == RUN_KEYS
    assert run_clip["speedup_samples_per_s"] > 0
    if not torch.cuda.is_available():
        assert figures["gpu"] == {"skipped": "no CUDA device"}


def test_gpu_measurement_runs_every_mode_with_tiny_towers(photo_root, tmp_path, one_thread):
    photos = benchmark_photos(24, quick=True, root=photo_root)[:8]
    batch_sizes = {"lit_cached": 4, "lit": 4, "full": 4}
    figures = bench_train.model_throughput(photos, tmp_path, QUICK_TOWERS, batch_sizes, workers=0,
                                           warmup_steps=1, timed_steps=1, bf16=False)  # fmt: skip
    for mode in batch_sizes:
        assert figures[mode]["samples_per_s"] > 0
        assert figures[mode]["model_gflops_per_sample"] > 0
        if not torch.cuda.is_available():
            assert figures[mode]["peak_memory_gib"] is None and figures[mode]["mfu"] is None


def test_training_flops_count_vit_b16_at_its_published_size():
    cached, lit, full = (training_flops_per_sample(VIT_B16_BERT_BASE, 64, mode)
                         for mode in ("lit_cached", "lit", "full"))  # fmt: skip
    vision_forward = lit - cached
    assert vision_forward == pytest.approx(2 * 17.6e9, rel=0.02)  # ViT-B/16 at 224 px: 17.6 GMACs
    assert full - cached == pytest.approx(3 * vision_forward)
