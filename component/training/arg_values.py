"""Raw argument values before the dataclasses see them: the JSON file, command-line overrides,
transformers 4.x key names, and a type check against each field's annotation.

HfArgumentParser.parse_dict passes values to the dataclasses unchecked, so `"learning_rate": "1e-3"`
would end in a traceback deep in the optimizer and `"freeze_vision_model": "false"` would count as true.
Everything here raises ArgumentError with one line that names the source, the key and the value.
"""

import enum
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any

from datatools.errors import UserError

logger = logging.getLogger(__name__)


class ArgumentError(UserError, ValueError):
    """A bad training configuration; the message names the file, key and value."""


# transformers 4.x names that transformers 5 renamed; the original CLIP-Chinese arg files use some.
RENAMED_KEYS = {
    "no_cuda": "use_cpu",
    "warmup_ratio": "warmup_steps",  # transformers 5 reads warmup_steps < 1 as a ratio
    "evaluation_strategy": "eval_strategy",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "push_to_hub_token": "hub_token",
    "push_to_hub_model_id": "hub_model_id",
}

# transformers 4.x keys that transformers 5 removed without a replacement key.
REMOVED_KEYS = ("overwrite_output_dir", "logging_dir", "use_mps_device", "fp16_backend", "tpu_num_cores")


def show(value: Any) -> str:
    """A value as it is written in JSON, so that "1e-3" (a string) and 1e-3 read differently."""
    return json.dumps(value, ensure_ascii=False)


def read_arg_file(path: Path) -> dict:
    """The JSON object in `path`; bad encoding, malformed JSON and a non-object top level are one line."""
    if not path.is_file():
        raise ArgumentError(f"{path}: no such arg file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # Windows Notepad writes a byte-order mark; it is harmless
    except UnicodeDecodeError as error:
        raise ArgumentError(
            f"{path}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); save the arg file "
            "as UTF-8 (GBK and other Windows code pages are not read)"
        ) from None
    try:
        values = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ArgumentError(
            f"{path}: line {error.lineno} column {error.colno}: not valid JSON: {error.msg}"
        ) from None
    except ArgumentError as error:
        raise ArgumentError(f"{path}: {error}") from None
    if not isinstance(values, dict):
        raise ArgumentError(
            f"{path}: the top level is {_json_kind(values)}; expected a JSON object of argument names "
            'to values, e.g. {"train_file": "data/train.csv"}'
        )
    return values


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of two equal keys silently; a duplicated key is a copy-paste mistake
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ArgumentError(f"key {key} appears twice")
        seen[key] = value
    return seen


def translate_old_names(values: dict, source: str) -> dict:
    """`values` with transformers 4.x keys renamed; both names with different values are refused."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old not in values:
            continue
        value = values.pop(old)
        if old == "warmup_ratio":
            value = _warmup_ratio_as_steps(value, values.get("warmup_steps"), source)
            if value is None:  # 0 was transformers 4.x's "no ratio"; warmup_steps decides
                logger.warning(f"{source}: warmup_ratio 0 (transformers 4.x: no ratio) is ignored")
                continue
            if values.get("warmup_steps") == 0:  # 4.x read a ratio where warmup_steps was 0
                del values["warmup_steps"]
        if new in values and values[new] != value:
            raise ArgumentError(
                f"{source}: {old} {show(value)} and {new} {show(values[new])} disagree; {old} is the "
                f"transformers 4.x name of {new}, keep only {new}"
            )
        values[new] = value
        logger.warning(f"{source}: {old} is the transformers 4.x name of {new}; read as {new}: {show(value)}")
    return values


def _warmup_ratio_as_steps(ratio: Any, steps: Any, source: str) -> Any:
    """The warmup_steps value for a 4.x warmup_ratio, or None where the ratio is unset (0)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ArgumentError(f"{source}: warmup_ratio must be a number in [0, 1), got {show(ratio)}")
    if ratio == 0:
        return None
    if steps not in (None, 0, ratio):
        raise ArgumentError(
            f"{source}: warmup_ratio {show(ratio)} and warmup_steps {show(steps)} disagree; give one: "
            "warmup_steps below 1 is a ratio of the training steps"
        )
    return ratio


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


def _members(annotation: Any) -> tuple:
    """The alternatives of a Union (`int | None` -> (int, NoneType)), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a JSON value fits a field annotation; classes this check does not know are accepted."""
    for member in _members(annotation):
        origin = typing.get_origin(member) or member
        if member is Any:
            return True
        if origin is typing.Literal:
            if any(value == option and type(value) is type(option) for option in typing.get_args(member)):
                return True
        elif value is None:
            if member is type(None):
                return True
        elif isinstance(value, bool):  # before int: JSON true is not the number 1 here
            if member is bool:
                return True
        elif origin in (bool, int, float, str, list, dict):
            if (origin is float and isinstance(value, int)) or isinstance(value, origin):
                return True
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            if isinstance(value, str):
                return True
        elif member is not type(None):
            return True  # e.g. ParallelismConfig: left to transformers
    return False


def _expected(annotation: Any) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}  # fmt: skip
    names = []
    for member in _members(annotation):
        origin = typing.get_origin(member) or member
        if origin is typing.Literal:
            names += [show(option) for option in typing.get_args(member)]
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            names.append("a string")
        else:
            names.append(words.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(dict.fromkeys(names))


def check_value_types(values: dict, annotations: dict[str, Any], source: str) -> dict:
    """`values` checked against the field annotations; integral floats for integer fields become ints.

    A string where a number or boolean is expected is refused (JSON has its own numbers and true/false),
    an integer where a float is expected is fine, and null only where the field is Optional.
    """
    checked = dict(values)
    for key, value in values.items():
        annotation = annotations.get(key, Any)
        if isinstance(value, float) and value.is_integer() and _accepts(annotation, int(value)):
            checked[key] = value = int(value)  # 1e4 is a float in JSON
        if isinstance(value, list) and _accepts(annotation, value):
            _check_list_items(key, value, annotation, source)
        elif not _accepts(annotation, value):
            hint = ""
            if isinstance(value, str) and _accepts(annotation, _json_or_none(value)):
                hint = f"; write {value} without quotes"
            raise ArgumentError(
                f"{source}: {key} must be {_expected(annotation)}, got {show(value)} "
                f"({_json_kind(value)}){hint}"
            )
    return checked


def _check_list_items(key: str, value: list, annotation: Any, source: str) -> None:
    for member in _members(annotation):
        if typing.get_origin(member) is list:
            (item_type,) = typing.get_args(member) or (Any,)
            for item in value:
                if not _accepts(item_type, item):
                    raise ArgumentError(
                        f"{source}: {key} must be a list of {_expected(item_type)}, got {show(value)}"
                    )
            return


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # still a string, which the caller already refused


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def parse_override_tokens(tokens: list[str], annotations: dict[str, Any]) -> dict:
    """`--key value` and `--key=value` pairs from the command line, converted to each field's type.

    A boolean field may stand alone (`--bf16` means true); an unknown key is returned unconverted so
    that the caller's unknown-key check names it.
    """
    values, position = {}, 0
    while position < len(tokens):
        token = tokens[position]
        if not token.startswith("--") or token == "--":
            raise ArgumentError(f"command line: unexpected {token!r}; overrides are written --key value")
        key, has_value, text = token[2:].partition("=")
        annotation = annotations.get(RENAMED_KEYS.get(key, key), Any)
        if not has_value:
            next_is_value = position + 1 < len(tokens) and not tokens[position + 1].startswith("--")
            if next_is_value:
                text, position = tokens[position + 1], position + 1
            elif bool in _members(annotation):
                text = "true"
            else:
                raise ArgumentError(f"command line: --{key} needs a value")
        values[key] = convert_text(key, text, annotation)
        position += 1
    return values


def convert_text(key: str, text: str, annotation: Any) -> Any:
    """A command-line string as the field's type: numbers, true/false/1/0/yes/no, lists, objects, null."""
    members = [typing.get_origin(member) or member for member in _members(annotation)]
    word = text.strip().lower()
    if type(None) in members and (word == "null" or (word == "none" and str not in members)):
        return None
    if list in members and text.lstrip().startswith("["):
        return _json_or_none(text)  # the type check names a list that is not valid JSON
    if list in members and (str not in members or "," in text):
        return [item.strip() for item in text.split(",") if item.strip()]
    if dict in members and text.lstrip().startswith("{"):
        return _json_or_none(text)
    if (
        str in members
        or annotation is Any
        or any(isinstance(m, type) and issubclass(m, enum.Enum) for m in members)
    ):
        return text
    if bool in members:
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
    elif int in members or float in members:
        try:
            return int(text) if int in members else float(text)
        except ValueError:
            pass
    raise ArgumentError(f"command line: --{key} must be {_expected(annotation)}, got {text!r}")
