"""Data, arg files and interruptions for short CPU training runs of the tiny towers, shared by the tests."""

import json
import os
import random
import signal
from pathlib import Path

from transformers import TrainerCallback

from component.testing.demo import all_combinations, write_split


def write_shapes(directory: Path, train: int, test: int = 0, seed: int = 0) -> Path:
    """`train` random and the first `test` coloured-shape images with Chinese captions in `directory`
    (train.csv, test.csv, images/); the same seed always gives the same data."""
    rng = random.Random(seed)
    combinations = all_combinations()
    write_split(directory, "train", [rng.choice(combinations) for _ in range(train)], rng, vary_template=True)
    if test:
        write_split(directory, "test", combinations[:test], rng, vary_template=False)
    return directory


class KillAtStep(TrainerCallback):
    """Simulate `kill -9` right after the given step: no cleanup, no final save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_until_killed(args_path: Path, kill_step: int) -> None:
    """A training run of `args_path` that kills its own process after step `kill_step`."""
    from component.training.arguments import parse_train_args
    from component.training.run import run_training

    run_training(*parse_train_args(args_path), extra_callbacks=(KillAtStep(kill_step),))


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
