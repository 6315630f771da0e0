"""Checks of parsed arguments against the world outside the arg file: paths that must exist, logging
packages that must be installed, and a run length and batch that can teach the model something.

They run while the arguments are parsed, so that a wrong path is reported in seconds, not after the
models have loaded.
"""

import importlib.util
import os
import re
from pathlib import Path

from transformers import TrainingArguments

from component.training.arg_values import ArgumentError
from datatools.data_kind import data_kind
from datatools.shards import ShardError, list_shards

# report_to name -> (modules of which one must import, what to pip install)
REPORTING_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dagshub": (("dagshub",), "dagshub mlflow"),
    "neptune": (("neptune",), "neptune"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "flyte": (("flytekit",), "flytekit flytekitplugins-deck-standard"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
    "azure_ml": (("azureml",), "azureml-core"),
    "kubeflow": ((), ""),  # no package: it reports to KUBEFLOW_TRAINER_SERVER_URL
}

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, as on the Hugging Face hub


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(path: str | Path, report_to: str | list[str] | None) -> None:
    """Refuse a report_to integration whose package is missing; the Trainer would crash on it later."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):  # "all" means every integration that is installed
            continue
        if name not in REPORTING_PACKAGES:
            raise ArgumentError(
                f"{path}: report_to {name!r} is not an integration transformers knows; use one of "
                f"{', '.join(REPORTING_PACKAGES)}, 'all' or 'none'"
            )
        modules, package = REPORTING_PACKAGES[name]
        if modules and not any(_installed(module) for module in modules):
            raise ArgumentError(
                f"{path}: report_to {name!r} needs a package that is not installed: pip install {package} "
                "(or drop it from report_to)"
            )


def check_training_length(path: str | Path, training_args: TrainingArguments) -> None:
    """Refuse a run that would learn nothing: no steps, or a contrastive batch of one row."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ArgumentError(
            f"{path}: max_steps must be a positive number of steps, or -1 to train num_train_epochs, got "
            f"{training_args.max_steps}"
        )
    if training_args.max_steps == -1 and training_args.num_train_epochs <= 0:
        raise ArgumentError(
            f"{path}: num_train_epochs must be above 0, got {training_args.num_train_epochs}; nothing "
            "would be learnt"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; the loss gathers across ranks
    batch = training_args.per_device_train_batch_size
    if batch < 1 or batch * world < 2:
        raise ArgumentError(
            f"{path}: per_device_train_batch_size {batch} x {world} process(es) gives a contrastive batch "
            "of fewer than 2 rows; the loss of a one-row batch is 0 (there are no negatives), so nothing "
            "would be learnt: use a larger batch"
        )


def looks_local(value: str) -> bool:
    """Whether a model reference is a directory path rather than a hub id such as 'owner/name'."""
    if os.path.exists(os.path.expanduser(value)):
        return True
    if value.startswith(("/", "./", "../", "~")) or value.startswith((".\\", "..\\")):
        return True
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(separator in value for separator in separators) and not HUB_ID.match(value)


def check_paths(path: str | Path, model_args, data_args) -> None:
    """Refuse a data path that does not exist, or a local model path that is not a directory.

    Relative paths are read from the current directory, as the training run reads them. Hub ids
    ('owner/name') are left to the loader. Only the model paths the run will load are checked.
    """
    for key in ("train_file", "test_file", "image_path"):
        value = getattr(data_args, key)
        if value and key != "image_path" and data_kind(value) == "shards":
            try:
                list_shards(value)
            except ShardError as error:
                raise ArgumentError(f"{path}: {key}: {error}") from None
        elif value and not os.path.exists(value):
            raise ArgumentError(
                f"{path}: {key} {value!r} does not exist (relative paths are read from {os.getcwd()})"
            )
    if data_args.image_path and not os.path.isdir(data_args.image_path):
        raise ArgumentError(f"{path}: image_path {data_args.image_path!r} is not a directory")
    model_keys = ["model_name_or_path"] if model_args.model_name_or_path else [
        "clip_pretrain_path", "text_pretrain_path"]  # fmt: skip
    for key in model_keys:
        value = getattr(model_args, key)
        if looks_local(value) and not os.path.isdir(os.path.expanduser(value)):
            raise ArgumentError(
                f"{path}: {key} {value!r} is not a model directory (it looks like a local path, not a hub "
                f"id such as 'owner/name'; relative paths are read from {os.getcwd()})"
            )
