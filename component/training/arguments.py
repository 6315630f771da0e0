"""Training arguments: typed dataclasses read from one JSON file together with TrainingArguments.

Command-line `--key value` pairs override the file, with the same checks. Keys that transformers 4.x
used (no_cuda, warmup_ratio, evaluation_strategy, ...) are read under their new names with a warning.
"""

import codecs
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from component.configuration import TEXT_POOLINGS
from component.loss import LOSSES
from component.training.arg_checks import check_paths, check_report_to, check_training_length
from component.training.arg_values import (
    REMOVED_KEYS,
    RENAMED_KEYS,
    ArgumentError,
    check_value_types,
    parse_override_tokens,
    read_arg_file,
    translate_old_names,
)
from datatools.data_kind import data_kind

DEFAULT_TEXT_TOWER = "Langboat/mengzi-bert-base"


def names_image_files(data: str | None) -> bool:
    """Whether a train_file/test_file value is a CSV, whose filenames are relative to image_path."""
    return bool(data) and data_kind(data) == "csv"


@dataclass
class ModelArguments:
    """Where the model starts from."""

    clip_pretrain_path: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={
            "help": "CLIPModel checkpoint (hub id or directory) for the image tower and image processor."
        },
    )
    text_pretrain_path: str = field(
        default=DEFAULT_TEXT_TOWER,
        metadata={
            "help": "Any transformers text encoder checkpoint (hub id or directory): BERT, RoBERTa-wwm, "
            "ERNIE, XLM-R, ...; the text tower and tokenizer."
        },
    )
    bert_pretrain_path: str | None = field(
        default=None, metadata={"help": "Old name of text_pretrain_path, still read."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue from a BertCLIP, ChineseCLIP or original CLIP-Chinese checkpoint instead of "
            "clip_pretrain_path + text_pretrain_path."
        },
    )
    load_from_bert_clip: bool = field(
        default=False,
        metadata={"help": "Old name: true means clip_pretrain_path is a whole BertCLIP checkpoint."},
    )
    text_pooling: str = field(
        default="cls",
        metadata={
            "help": "'cls' (first token's hidden state, as Chinese-CLIP), 'pooler' (the tower's pooler "
            "output, where it has one) or 'mean' (mean over the non-padding tokens)."
        },
    )

    def __post_init__(self):
        if self.text_pooling not in TEXT_POOLINGS:
            raise ArgumentError(f"text_pooling must be 'cls', 'pooler' or 'mean', got {self.text_pooling!r}")
        if self.bert_pretrain_path is not None:  # the old name wins only where the new one is not set
            if self.text_pretrain_path not in (self.bert_pretrain_path, DEFAULT_TEXT_TOWER):
                raise ArgumentError(
                    f"bert_pretrain_path {self.bert_pretrain_path!r} and text_pretrain_path "
                    f"{self.text_pretrain_path!r} disagree; keep only text_pretrain_path"
                )
            self.text_pretrain_path = self.bert_pretrain_path
        if self.load_from_bert_clip and self.model_name_or_path is None:
            self.model_name_or_path = self.clip_pretrain_path


@dataclass
class DataArguments:
    """The image-text CSV files and how samples are read."""

    train_file: str = field(
        default=None,
        metadata={
            "help": "Training data (required): a CSV with columns text and filename; webdataset shards "
            "(a brace pattern such as data/{00000..00099}.tar, a glob, or a directory of .tar files); "
            "or Chinese-CLIP data (a *_texts.jsonl beside its *_imgs.tsv, or an LMDB directory)."
        },
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Test data for evaluation and retrieval metrics, in any train_file form."},
    )
    image_path: str | None = field(
        default=None, metadata={"help": "Directory the CSV filenames are relative to (CSV data only)."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Texts are truncated to this many tokens."})
    num_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Samples in one epoch of webdataset shards, when no sizes.json or shard counts give it."
        },
    )
    shuffle_buffer: int = field(
        default=10_000, metadata={"help": "Samples held to shuffle a stream of webdataset shards."}
    )
    max_bad_image_fraction: float = field(
        default=0.01,
        metadata={"help": "Stop training if more than this fraction of images fail to load."},
    )
    draft_decode: bool = field(
        default=True,
        metadata={
            "help": "Decode large JPEGs at reduced size (PIL draft mode); much faster, nearly identical."
        },
    )
    csv_encoding: str | None = field(
        default=None,
        metadata={"help": "Encoding of train_file and test_file (e.g. gbk); default: UTF-8, else GB18030."},
    )

    def __post_init__(self):
        if not self.train_file:
            raise ArgumentError("train_file is required")
        if not self.image_path and any(map(names_image_files, (self.train_file, self.test_file))):
            raise ArgumentError(
                "image_path is required: a CSV's filenames are relative to it (shards and Chinese-CLIP data "
                "hold their images)"
            )
        if self.csv_encoding is not None:
            try:
                codecs.lookup(self.csv_encoding)
            except LookupError:
                raise ArgumentError(
                    f"csv_encoding: unknown encoding {self.csv_encoding!r} (try utf-8 or gb18030)"
                ) from None
        if self.max_seq_length < 2:
            raise ArgumentError(f"max_seq_length must be at least 2, got {self.max_seq_length}")
        if not 0 <= self.max_bad_image_fraction <= 1:
            raise ArgumentError(
                f"max_bad_image_fraction must be in [0, 1], got {self.max_bad_image_fraction}"
            )


@dataclass
class TowerArguments:
    """How the towers train: the loss, which towers are locked, and when the image tower unlocks (LiT,
    then Chinese-CLIP's second stage)."""

    loss: str = field(
        default="clip",
        metadata={
            "help": "'clip' (softmax over the batch, both directions) or 'siglip' (sigmoid over every pair; "
            "a model without a logit bias starts at logit_scale ln 10, logit_bias -10)."
        },
    )
    dedupe_captions_in_batch: bool = field(
        default=False,
        metadata={
            "help": "Rows of a batch with the same caption are not each other's negatives (for class names "
            "used as captions)."
        },
    )

    freeze_vision_model: bool = field(default=True, metadata={"help": "Lock the image tower (LiT)."})
    freeze_vision_projection: bool = field(
        default=True,
        metadata={"help": "Also lock the image projection, so the image embedding space stays fixed (LiT)."},
    )
    freeze_text_model: bool = field(default=False, metadata={"help": "Lock the BERT text tower."})
    unlock_vision_at: str | None = field(
        default=None,
        metadata={
            "help": "Unlock the image tower at this optimizer step, or 'plateau': when eval_mean_recall "
            "has not improved for unlock_patience evaluations."
        },
    )
    unlock_patience: int = field(
        default=2, metadata={"help": "Evaluations without improvement for 'plateau'."}
    )
    vision_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the image tower once unlocked; default: learning_rate / 10."},
    )
    cache_image_features: bool = field(
        default=False,
        metadata={
            "help": "LiT only: compute each image embedding once, store it on disk and train the text side "
            "against it."
        },
    )
    contrastive_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Gradient caching: contrast K micro-batches at once; the loss sees K x batch negatives."
        },
    )

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ArgumentError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if isinstance(self.unlock_vision_at, int | float) and not isinstance(self.unlock_vision_at, bool):
            self.unlock_vision_at = str(int(self.unlock_vision_at))
        value = self.unlock_vision_at
        if value is not None and value != "plateau" and not (value.isdigit() and int(value) >= 0):
            raise ArgumentError(f"unlock_vision_at must be a step number or 'plateau', got {value!r}")
        if value is not None and not self.freeze_vision_model:
            raise ArgumentError(
                "unlock_vision_at needs freeze_vision_model: true (there is nothing to unlock)"
            )
        if self.unlock_patience < 1:
            raise ArgumentError(f"unlock_patience must be at least 1, got {self.unlock_patience}")
        if self.vision_learning_rate is not None and self.vision_learning_rate < 0:
            raise ArgumentError(f"vision_learning_rate must be >= 0, got {self.vision_learning_rate}")
        if self.cache_image_features and not (self.freeze_vision_model and self.freeze_vision_projection):
            raise ArgumentError("cache_image_features needs freeze_vision_model and freeze_vision_projection")
        if self.cache_image_features and value is not None:
            raise ArgumentError("cache_image_features cannot be combined with unlock_vision_at")
        if self.contrastive_accumulation_steps < 1:
            raise ArgumentError(
                f"contrastive_accumulation_steps must be >= 1, got {self.contrastive_accumulation_steps}"
            )

    @property
    def unlock_step(self) -> int | None:
        """The step of a fixed unlock, or None."""
        return int(self.unlock_vision_at) if self.unlock_vision_at not in (None, "plateau") else None


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TowerArguments, TrainingArguments)

# Where the library's defaults do not suit CLIP training. Frozen towers are left out of DDP,
# so every parameter it sees gets a gradient. Image decoding needs worker processes.
TRAINING_DEFAULTS = {
    "report_to": "none",
    "logging_steps": 10,
    "save_total_limit": 2,
    "ddp_find_unused_parameters": False,
    "dataloader_num_workers": min(8, os.cpu_count() or 1),
    "dataloader_pin_memory": True,
}


# unlock_vision_at is a string field so that it can hold 'plateau'; a step number may be written as one.
ALSO_ACCEPTED = {"unlock_vision_at": str | int | None}


def describe_arguments() -> str:
    """Every key this toolkit adds to TrainingArguments, with its default and help text."""
    lines = []
    for cls in ARGUMENT_CLASSES[:-1]:
        lines.append(f"{cls.__name__}: {cls.__doc__}")
        lines += [f"  {f.name} (default {f.default!r}): {f.metadata['help']}" for f in fields(cls)]
    lines.append("TrainingArguments: every transformers TrainingArguments field, e.g. learning_rate, bf16.")
    renamed = ", ".join(f"{old} -> {new}" for old, new in RENAMED_KEYS.items())
    lines.append(f"transformers 4.x names read under their new names: {renamed}.")
    return "\n".join(lines)


def known_keys() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}


def field_annotations() -> dict[str, Any]:
    """The type annotation of every key, which the values are checked against before parsing."""
    annotations = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        annotations.update({f.name: hints.get(f.name, Any) for f in fields(cls) if f.init})
    return {**annotations, **ALSO_ACCEPTED}


def check_known_keys(values: dict, source: str, prefix: str = "") -> None:
    """Refuse unknown keys, naming the closest known key or saying that transformers 5 removed it."""
    unknown = sorted(set(values) - known_keys())
    if not unknown:
        return
    hints = []
    for key in unknown:
        if key in REMOVED_KEYS:
            hints.append(f"{prefix}{key} (a transformers 4.x key that transformers 5 removed; delete it)")
        elif match := difflib.get_close_matches(key, known_keys(), 1):
            hints.append(f"{prefix}{key} (did you mean {prefix}{match[0]}?)")
        else:
            hints.append(f"{prefix}{key}")
    raise ArgumentError(f"{source}: unknown key(s): {', '.join(hints)}")


def check_deepspeed_conflicts(path: str | Path, values: dict) -> None:
    """Refuse the toolkit features that DeepSpeed's engine does not support."""
    if not values.get("deepspeed"):
        return
    if values.get("unlock_vision_at") is not None:
        raise ArgumentError(
            f"{path}: unlock_vision_at is not supported with deepspeed; train the second stage as its own "
            "run (see train_args/train_clip_stage2.json)"
        )
    if values.get("contrastive_accumulation_steps", 1) != 1:
        raise ArgumentError(
            f"{path}: contrastive_accumulation_steps is not supported with deepspeed (ZeRO partitions "
            "the gradients that gradient caching accumulates); use DDP through torchrun instead"
        )


def command_line_overrides(tokens: list[str]) -> dict:
    """`--key value` pairs from the command line as typed values (see parse_override_tokens)."""
    return parse_override_tokens(tokens, field_annotations())


def checked_values(values: dict, source: str, prefix: str = "") -> dict:
    """Old names translated, unknown keys and wrong value types refused."""
    values = translate_old_names(values, source)
    check_known_keys(values, source, prefix)
    return check_value_types(values, field_annotations(), source)


def parse_train_args(
    path: str | Path, overrides: dict | None = None, check_files: bool = True
) -> tuple[ModelArguments, DataArguments, TowerArguments, TrainingArguments]:
    """Read and validate a JSON arg file; unknown keys and bad values raise ArgumentError naming them.

    `overrides` replace values from the file: the command line's (see command_line_overrides), or
    tests' that check GPU configs on a CPU. `check_files=False` skips the checks that the data and
    model paths exist, for configs whose data is elsewhere.
    """
    path = Path(path)
    values = checked_values(read_arg_file(path), str(path))
    overrides = checked_values(overrides or {}, "command line", prefix="--")
    values = {**TRAINING_DEFAULTS, **values, **overrides}
    values.setdefault("dataloader_persistent_workers", values["dataloader_num_workers"] > 0)
    values["remove_unused_columns"] = False  # the collator needs the raw text and image columns
    check_deepspeed_conflicts(path, values)  # before TrainingArguments, which sets up DeepSpeed
    check_report_to(path, values.get("report_to"))
    try:
        model_args, data_args, tower_args, training_args = HfArgumentParser(ARGUMENT_CLASSES).parse_dict(
            values
        )
    except (ValueError, TypeError) as error:  # ArgumentError is a ValueError
        raise ArgumentError(f"{path}: {error}") from error
    if training_args.per_device_train_batch_size < tower_args.contrastive_accumulation_steps:
        raise ArgumentError(
            f"{path}: per_device_train_batch_size {training_args.per_device_train_batch_size} is smaller "
            f"than contrastive_accumulation_steps {tower_args.contrastive_accumulation_steps}; each "
            "micro-batch needs at least one row"
        )
    if tower_args.unlock_vision_at == "plateau" and not data_args.test_file:
        raise ArgumentError(f"{path}: unlock_vision_at 'plateau' needs a test_file to measure recall on")
    check_training_length(path, training_args)
    if check_files:
        check_paths(path, model_args, data_args)
    return model_args, data_args, tower_args, training_args
