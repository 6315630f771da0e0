"""A training run's output directory: its lock, the final model written whole, and the run's records.

An output directory holds, besides checkpoints and the final model:

    .train.lock          locked (flock) by the run in progress, so that two runs never interleave
    .final-model.tmp/    the final model while it is written; its files are then renamed into place
    toolkit_args.json    the toolkit's arguments the run was made with (also in every checkpoint)
    run_complete.json    written last: the run finished, so a re-run changes nothing
"""

import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from component.loss import world_size
from component.training.trainer import newest_complete_checkpoint
from datatools.atomic import sync_path, write_json_atomic
from datatools.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
STAGING_DIR = ".final-model.tmp"
ARGS_FILE = "toolkit_args.json"
FINISHED_MARKER = "run_complete.json"
LAST_FILE = "config.json"  # renamed into place last: a directory without it is no model to any loader
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")
NEARLY_FULL_BYTES = 16 * 2**20  # torch.save's failed write names no errno; a file system this full is full
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
# Keys of the arguments record that may differ on a resume without changing what is trained.
VOLATILE_ARGS = {"resume_from_checkpoint", "output_dir", "logging_dir", "run_name"}


class OutputDirError(UserError):
    """The output directory cannot be used: not a directory, not writable, or held by another run."""


class DiskFullError(UserError):
    """The disk filled up while the run wrote to its output directory."""


class RunInterrupted(UserError):
    """The user interrupted the run (Ctrl-C); exit code 130 as for SIGINT."""

    exit_code = 130


def open_lock_file(directory: Path):
    """Create `directory` if missing and open its lock file; a file in the way or a read-only file
    system is one line naming the path."""
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"output_dir {directory}: exists and is not a directory; choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return open(directory / LOCK_FILE, "a")
    except OSError as error:
        reason = "read-only file system" if error.errno == errno.EROFS else error.strerror or str(error)
        raise OutputDirError(
            f"output_dir {directory}: cannot write there ({reason}); choose a writable directory"
        ) from error


@contextmanager
def output_dir_lock(training_args: TrainingArguments) -> Iterator[None]:
    """Hold the output directory's lock for one run; refuse at once, in every process, when the
    directory is unusable or another run holds it.

    Only the first process (rank 0) takes the flock; the others learn its outcome. The kernel
    releases an flock when its holder exits or is killed, so a killed run blocks no later one.
    """
    directory = Path(training_args.output_dir)
    lock_file, refusal = None, None
    if training_args.process_index == 0:
        try:
            lock_file = open_lock_file(directory)
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OutputDirError as error:
            refusal = error
        except BlockingIOError:
            refusal = OutputDirError(
                f"output_dir {directory}: another training run is writing there (it holds "
                f"{directory / LOCK_FILE}); wait for it to finish or choose another output_dir"
            )
    if world_size() > 1:  # every process stops when the first one cannot go on
        refused = torch.tensor([refusal is not None], dtype=torch.int32, device=training_args.device)
        dist.all_reduce(refused)
        if refused.item() and refusal is None:
            refusal = OutputDirError(f"output_dir {directory}: refused by the first process (see its error)")
    try:
        if refusal is not None:
            raise refusal
        yield
    finally:
        if lock_file is not None:
            lock_file.close()  # releases the flock


# --- the disk filling up ------------------------------------------------------------------------


def free_bytes(path: Path) -> int | None:
    """Bytes free on the file system holding `path`, or None when it cannot be asked."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` (or an error it came from) says the disk is full, or the disk looks full.

    safetensors reports ENOSPC only in its message, and torch.save not at all, so a failed write
    on a file system with next to nothing left also counts.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(message in str(seen) for message in DISK_FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    writing = isinstance(error, OSError) or any(sign in str(error) for sign in TORCH_WRITE_FAILURES)
    free = free_bytes(path)
    return writing and free is not None and free < NEARLY_FULL_BYTES


@contextmanager
def stop_when_disk_full(output_dir: str | Path, doing: str) -> Iterator[None]:
    """Turn a full disk while `doing` into one line naming where; anything else keeps its traceback."""
    output_dir = Path(output_dir)
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, output_dir):
            raise
        free = free_bytes(output_dir)
        room = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        kept = newest_complete_checkpoint(output_dir) or "none yet"
        raise DiskFullError(
            f"disk full while {doing} in {output_dir} ({room}; {type(error).__name__}: {error}); "
            f"newest complete checkpoint: {kept}. Free some space and re-run the same command to resume"
        ) from error


# --- the final model, whole or not at all -------------------------------------------------------


def publish_directory(staging: Path, target: Path) -> None:
    """Rename every file of `staging` into `target`, config.json last, then remove `staging`.

    The old config.json goes first, so that a directory caught half-way holds no loadable mix of
    two models; renames need no disk space, so a full disk cannot stop them half-way.
    """
    (target / LAST_FILE).unlink(missing_ok=True)
    new_names = {path.name for path in staging.iterdir()}
    for old in (*target.glob("model*.safetensors*"), *target.glob("pytorch_model*.bin*")):
        if old.name not in new_names:  # weights of another layout (sharded or not) would shadow the new
            old.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == LAST_FILE):
        destination = target / path.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(path, destination)
    staging.rmdir()
    sync_path(target)


def save_final_model(trainer, output_dir: str | Path, records: dict[str, dict]) -> None:
    """Save the model and processor into a staging directory, then publish it into `output_dir`.

    records: JSON files (name -> content) saved beside the model, such as the arguments record.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_DIR
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    if world_size() > 1:
        dist.barrier()
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            for name, content in records.items():
                write_json_atomic(staging / name, content)
    except BaseException:
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # give the space back; the old model is whole
        raise
    if world_size() > 1:
        dist.barrier()  # every process has written its part
    if trainer.args.should_save:
        publish_directory(staging, output_dir)


# --- what a run was made with, and whether it has finished --------------------------------------


def arguments_record(model_args, data_args, tower_args, training_args: TrainingArguments) -> dict:
    """The run's arguments as JSON: the toolkit's dataclasses and every TrainingArguments field."""
    return {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "tower": asdict(tower_args),
        "training": training_args.to_sanitized_dict(),
    }


class ArgumentsRecordCallback(TrainerCallback):
    """Write the arguments record into every checkpoint; listed before the completion marker's
    callback, so that a complete checkpoint always has it."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and directory.is_dir():
            write_json_atomic(directory / ARGS_FILE, self.record)


def changed_arguments(checkpoint: str | Path, record: dict) -> list[str]:
    """The keys ("group.key: old -> new") whose values differ from those `checkpoint` was made with."""
    path = Path(checkpoint) / ARGS_FILE
    if not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    changes = []
    for group, values in record.items():
        old_values = saved.get(group, {})
        for key, value in values.items():
            if key not in VOLATILE_ARGS and key in old_values and old_values[key] != value:
                changes.append(f"{group}.{key}: {old_values[key]!r} -> {value!r}")
    return changes


def finished_run(training_args: TrainingArguments) -> dict | None:
    """The saved metrics of a run in this output directory that finished with these step targets,
    or None when there is training left to do."""
    directory = Path(training_args.output_dir)
    marker = directory / FINISHED_MARKER
    if not marker.is_file():
        return None
    finished = json.loads(marker.read_text(encoding="utf-8"))
    wanted = {"max_steps": training_args.max_steps, "num_train_epochs": training_args.num_train_epochs}
    if any(finished.get(key) != value for key, value in wanted.items()):
        return None  # asked for more (or other) training: resume from the newest checkpoint
    metrics = {}
    for name in ("train_results.json", "eval_results.json"):
        if (directory / name).is_file():
            metrics.update(json.loads((directory / name).read_text(encoding="utf-8")))
    return {**metrics, "global_step": finished.get("global_step")}


def mark_finished(training_args: TrainingArguments, global_step: int) -> None:
    """Record, as the run's very last write, that it finished."""
    if training_args.should_save:
        write_json_atomic(
            Path(training_args.output_dir) / FINISHED_MARKER,
            {"global_step": global_step, "max_steps": training_args.max_steps,
             "num_train_epochs": training_args.num_train_epochs},
        )  # fmt: skip
