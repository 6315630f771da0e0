"""Training on webdataset shards end to end: the same weights as the same samples from a CSV,
kill -9 and resume mid-epoch with DataLoader workers (shards and CSV), two gloo processes, and a
shard list that changed before a resume."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _runs import run_until_killed, tiny_run_args, write_args, write_shapes
from _shards import write_img2dataset_shards
from safetensors.torch import load_file

import train_clip

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """32 training and 12 test images as CSV + files, and the same as img2dataset shards."""
    directory = write_shapes(tmp_path_factory.mktemp("shard_runs"), train=32, test=12, seed=2)
    write_img2dataset_shards(directory / "train.csv", directory / "images", directory / "train_one", 32)
    write_img2dataset_shards(directory / "train.csv", directory / "images", directory / "train_shards", 4)
    write_img2dataset_shards(directory / "test.csv", directory / "images", directory / "test_shards", 5)
    return directory


def run(tmp_path: Path, name: str, values: dict) -> dict:
    return train_clip.main(["--train_args_file", str(write_args(tmp_path / f"{name}.json", **values))])


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_weights(expected: Path, got: Path) -> None:
    expected, got = weights(expected), weights(got)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_shards_train_like_the_same_samples_from_a_csv(tiny_towers, data, tmp_path):
    common = {"max_steps": 3, "test_file": None, "train_sampling_strategy": "sequential"}
    run(tmp_path, "csv", tiny_run_args(tiny_towers, data, tmp_path / "csv", **common))
    shards = {"train_file": str(data / "train_one"), "shuffle_buffer": 1}
    run(tmp_path, "shards", tiny_run_args(tiny_towers, data, tmp_path / "shards", **common, **shards))
    assert_same_weights(tmp_path / "csv", tmp_path / "shards")


@pytest.mark.parametrize("train_file", ["train.csv", "train_shards"])
def test_kill_mid_epoch_with_workers_and_rerun_ends_with_the_same_weights(
    tiny_towers, data, tmp_path, train_file
):
    # 4 batches an epoch; killed at step 6, resumed from step 5 (epoch 1, one batch in), into epoch 2.
    common = {"train_file": str(data / train_file), "test_file": None, "max_steps": 9, "save_steps": 5,
              "save_strategy": "steps", "dataloader_num_workers": 2, "dataloader_persistent_workers": True,
              "shuffle_buffer": 6}  # fmt: skip
    run(tmp_path, "reference", tiny_run_args(tiny_towers, data, tmp_path / "reference", **common))
    args_path = write_args(
        tmp_path / "k.json", **tiny_run_args(tiny_towers, data, tmp_path / "resumed", **common)
    )
    process = multiprocessing.get_context("spawn").Process(target=run_until_killed, args=(args_path, 6))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL
    metrics = train_clip.main(["--train_args_file", str(args_path)])
    assert metrics["resumed_at_step"] == 5
    assert_same_weights(tmp_path / "reference", tmp_path / "resumed")


def test_resume_refuses_changed_shards(tiny_towers, data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for path in (data / "train_shards").glob("*"):
        (shards / path.name).write_bytes(path.read_bytes())
    values = tiny_run_args(tiny_towers, data, tmp_path / "run", train_file=str(shards), test_file=None,
                           max_steps=2, save_strategy="steps", save_steps=2)  # fmt: skip
    run(tmp_path, "first", values)
    (shards / "00007.tar").rename(shards / "00007.tar.moved")  # nothing is deleted, by us either
    again = {**values, "output_dir": str(tmp_path / "again"), "max_steps": 3,
             "resume_from_checkpoint": str(tmp_path / "run" / "checkpoint-2")}  # fmt: skip
    with pytest.raises(SystemExit):
        run(tmp_path, "again", again)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert f"{shards}: the shards changed since {checkpoint}" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_training_on_shards_with_shard_evaluation(tiny_towers, data, tmp_path):
    output = tmp_path / "ddp"
    pattern = str(data / "train_shards" / "{00000..00007}.tar")
    values = tiny_run_args(tiny_towers, data, output, train_file=pattern, test_file=str(data / "test_shards"),
                           max_steps=3, ddp_backend="gloo")  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command = [*launcher, str(free_port()), str(REPO / "train_clip.py"), "--train_args_file",
               str(write_args(tmp_path / "a.json", **values))]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert evaluation["eval_images"] == 12 and evaluation["eval_mean_recall"] > 0
