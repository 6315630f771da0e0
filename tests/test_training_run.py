"""The life of a training run in its output directory: the lock, a bad or full output directory,
Ctrl-C, re-running a finished run, resuming, and the records a finished run leaves."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runs import tiny_run_args, write_args, write_shapes
from PIL import Image
from transformers import TrainerCallback

import train_clip
from component.encoding import load_model_and_processor
from component.training.arguments import parse_train_args
from component.training.run import run_training
from component.training.run_output import (
    ARGS_FILE,
    FINISHED_MARKER,
    LOCK_FILE,
    STAGING_DIR,
    DiskFullError,
    OutputDirError,
    output_dir_lock,
)
from component.training.trainer import CHECKPOINT_MARKER, newest_complete_checkpoint
from datatools.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """24 training and 12 test images of coloured shapes with Chinese captions."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), train=24, test=12)


def run_args(tiny_towers, shapes_data, tmp_path: Path, name: str, **overrides) -> Path:
    """An arg file (at tmp_path/name.json) for a tiny run into tmp_path/name."""
    values = tiny_run_args(tiny_towers, shapes_data, tmp_path / name, **{"max_steps": 4, **overrides})
    return write_args(tmp_path / f"{name}.json", **values)


@pytest.fixture(scope="module")
def finished(tiny_towers, shapes_data, tmp_path_factory) -> dict:
    """One finished run with checkpoints at steps 2 and 4 and a final evaluation."""
    root = tmp_path_factory.mktemp("finished")
    args = run_args(tiny_towers, shapes_data, root, "run", save_strategy="steps", save_steps=2)
    metrics = train_clip.main(["--train_args_file", str(args)])
    return {"output": root / "run", "args": args, "metrics": metrics}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory`: its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a tmpfs at `path`, or skip the test where this machine does not allow it."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """A directory on a 48 MiB tmpfs, unmounted afterwards."""
    path = tmp_path / "tmpfs"
    mount_tmpfs(path, "size=48m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


# --- 25: what a finished run leaves --------------------------------------------------------------


def test_finished_run_leaves_curves_card_and_arguments(finished):
    output = finished["output"]
    with Image.open(output / "training_curves.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 600
    card = (output / "README.md").read_text()
    assert card.startswith("---\nlanguage: zh\nlibrary_name: transformers\n")
    assert "train.csv` | 24 rows" in card and "test.csv` | 12 rows" in card
    assert "`tower.freeze_vision_model`" in card and "`learning_rate` | `0.001`" in card
    assert f"`eval_mean_recall` | {finished['metrics']['eval_mean_recall']:.4f}" in card
    for directory in (output, output / "checkpoint-2", output / "checkpoint-4"):
        arguments = json.loads((directory / ARGS_FILE).read_text())
        assert arguments["training"]["max_steps"] == 4, directory
        assert arguments["model"]["clip_pretrain_path"].endswith("clip"), directory
    assert (output / FINISHED_MARKER).is_file() and not (output / STAGING_DIR).exists()
    load_model_and_processor(output, device="cpu")


# --- 21: re-running a finished run, resuming ---------------------------------------------------------


def test_rerun_of_a_finished_run_changes_nothing(finished, capsys):
    before = snapshot(finished["output"])
    metrics = train_clip.main(["--train_args_file", str(finished["args"])])
    assert "has already finished (step 4); nothing to do" in capsys.readouterr().out
    assert snapshot(finished["output"]) == before
    assert metrics["train_loss"] == finished["metrics"]["train_loss"] > 0


def test_resumed_run_says_where_it_resumed(finished, tiny_towers, shapes_data, tmp_path, capsys, caplog):
    output = tmp_path / "resumed"
    shutil.copytree(finished["output"] / "checkpoint-2", output / "checkpoint-2")  # killed after step 2
    args = run_args(tiny_towers, shapes_data, tmp_path, "resumed", save_strategy="steps", save_steps=2,
                    learning_rate=5e-4, test_file=None)  # fmt: skip
    metrics = train_clip.main(["--train_args_file", str(args)])
    saved = json.loads((output / "train_results.json").read_text())
    assert saved["resumed_from_checkpoint"] == str(output / "checkpoint-2") and saved["resumed_at_step"] == 2
    assert metrics["resumed_at_step"] == 2
    assert "at step 2: train_loss covers steps 3-4 only" in capsys.readouterr().out
    assert "training.learning_rate: 0.001 -> 0.0005" in caplog.text


# --- 13, 14: a locked, misplaced or read-only output directory --------------------------------------


def test_second_run_into_the_same_output_dir_is_refused(tiny_towers, shapes_data, tmp_path):
    args = parse_train_args(run_args(tiny_towers, shapes_data, tmp_path, "run"))
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / LOCK_FILE, "a") as held:  # the first run, still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputDirError, match=r"run: another training run is writing there"):
            run_training(*args)
    assert not (tmp_path / "run" / "config.json").exists()


def test_lock_of_a_killed_run_blocks_nothing(tiny_towers, shapes_data, tmp_path):
    args = parse_train_args(run_args(tiny_towers, shapes_data, tmp_path, "run"))
    lock = tmp_path / "run" / LOCK_FILE
    lock.parent.mkdir()
    take_and_die = "import fcntl, os, signal, sys; f = open(sys.argv[1], 'a'); " \
                   "fcntl.flock(f, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)"  # fmt: skip
    assert subprocess.run([sys.executable, "-c", take_and_die, str(lock)]).returncode == -signal.SIGKILL
    with output_dir_lock(args[3]):
        pass


def test_output_dir_that_is_a_file_is_one_line_before_the_model_loads(
    tiny_towers, shapes_data, tmp_path, capsys, monkeypatch
):
    def no_model_yet(*args):
        raise AssertionError("the model loaded before output_dir was checked")

    monkeypatch.setattr("component.training.run.build_model_and_processor", no_model_yet)
    (tmp_path / "out").write_text("not a directory")
    values = tiny_run_args(tiny_towers, shapes_data, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: output_dir {tmp_path / 'out'}: exists and is not a "
                                        "directory; choose another path"]  # fmt: skip


def test_read_only_output_dir_is_one_line(tiny_towers, shapes_data, tmp_path):
    mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        values = tiny_run_args(tiny_towers, shapes_data, tmp_path / "ro" / "run")
        args = parse_train_args(write_args(tmp_path / "a.json", **values))
        with pytest.raises(OutputDirError, match=r"ro/run: cannot write there \(read-only file system\)"):
            run_training(*args)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)


# --- 15: a full disk -------------------------------------------------------------------------


def test_disk_full_at_a_checkpoint_stops_with_one_line(tiny_towers, shapes_data, tmp_path, monkeypatch):
    import transformers.modeling_utils

    real_save = transformers.modeling_utils.safe_save_file

    def save_until_full(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_until_full)
    args = run_args(tiny_towers, shapes_data, tmp_path, "run", save_strategy="steps", save_steps=2,
                    test_file=None)  # fmt: skip
    output = tmp_path / "run"
    kept = output / "checkpoint-2"
    with pytest.raises(DiskFullError, match=rf"disk full while training .* in {output} .*"
                       rf"newest complete checkpoint: {kept}\. Free some space"):  # fmt: skip
        run_training(*parse_train_args(args))
    assert newest_complete_checkpoint(output) == str(output / "checkpoint-2")
    assert not (output / "config.json").exists()


class FillTheDiskAtTrainEnd(TrainerCallback):
    """Leave no free byte on the output directory's file system just before the final save."""

    def on_train_end(self, args, state, control, **kwargs):
        free = shutil.disk_usage(args.output_dir).free
        with open(Path(args.output_dir) / "filler", "wb") as file:
            os.posix_fallocate(file.fileno(), 0, free)


def test_full_disk_at_the_final_save_leaves_no_partial_model(tiny_towers, shapes_data, tmpfs):
    output = tmpfs / "run"
    values = tiny_run_args(tiny_towers, shapes_data, output, max_steps=2, test_file=None)
    args = parse_train_args(write_args(tmpfs.parent / "a.json", **values))
    with pytest.raises(DiskFullError, match=rf"disk full while saving the final model in {output} "):
        run_training(*args, extra_callbacks=(FillTheDiskAtTrainEnd(),))
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE, "filler"]
    with pytest.raises(UserError, match=r"no config\.json"):  # one line in predict_similarity.py
        load_model_and_processor(output, device="cpu")


# --- 22: Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_says_how_to_resume_and_exits_130(tiny_towers, shapes_data, tmp_path):
    args = run_args(tiny_towers, shapes_data, tmp_path, "run", max_steps=10_000, save_strategy="steps",
                    save_steps=2, test_file=None)  # fmt: skip
    run = tmp_path / "run"  # any complete checkpoint: save_total_limit may have rotated checkpoint-2 away
    # stderr goes to a file, stdout nowhere: an unread pipe that fills up would stall the run
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_clip.py"), "--train_args_file", str(args)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(run.glob(f"checkpoint-*/{CHECKPOINT_MARKER}")) and process.poll() is None \
            and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    stderr.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after any progress bar cut short
    assert "error: interrupted; newest complete checkpoint: " in last
    assert str(tmp_path / "run" / "checkpoint-") in last
    assert last.endswith(f"re-run `python train_clip.py --train_args_file {args}` to resume")


def test_a_failed_torch_save_on_a_full_disk_counts_as_disk_full(tmpfs):
    import torch

    from component.training.run_output import is_disk_full

    with open(tmpfs / "filler", "wb") as file:
        os.posix_fallocate(file.fileno(), 0, shutil.disk_usage(tmpfs).free - 4096)
    with pytest.raises(RuntimeError) as error:  # torch.save's error names no errno
        torch.save({"weights": torch.zeros(100_000)}, tmpfs / "optimizer.pt")
    assert is_disk_full(error.value, tmpfs)
    assert not is_disk_full(RuntimeError("CUDA out of memory"), tmpfs)  # not a write: keeps its traceback
