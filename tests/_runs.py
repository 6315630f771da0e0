"""Arg files for short CPU training runs of the tiny towers, shared by the training tests."""

import json
from pathlib import Path


def tiny_run_args(tiny_towers: dict[str, Path], data_dir: Path, output_dir: Path, **overrides) -> dict:
    """Arg-file values for a short CPU run on a demo-style directory (train.csv, test.csv, images/)."""
    return {
        "output_dir": str(output_dir),
        "clip_pretrain_path": str(tiny_towers["clip"]),
        "text_pretrain_path": str(tiny_towers["bert"]),
        "train_file": str(data_dir / "train.csv"),
        "test_file": str(data_dir / "test.csv"),
        "image_path": str(data_dir / "images"),
        "max_seq_length": 24,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-3,
        "max_steps": 6,
        "logging_steps": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 7,
        **overrides,
    }


def write_args(path: Path, **values) -> Path:
    """`values` as a JSON arg file at `path`."""
    path.write_text(json.dumps(values, ensure_ascii=False))
    return path
