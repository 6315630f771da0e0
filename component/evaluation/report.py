"""What `evaluate.py` needs besides the metrics: the test data a trained model names, and the report."""

import json
from pathlib import Path

from component.errors import InputError
from component.training.run_output import ARGS_FILE  # what training writes beside the final model


def training_data_args(model_dir: str | Path) -> dict:
    """The "data" arguments a trained model's toolkit_args.json records ({} where there is none)."""
    path = Path(model_dir) / ARGS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read it ({error})") from None
    data = record.get("data") if isinstance(record, dict) else None
    return data if isinstance(data, dict) else {}


def resolve_test_data(model_dir: str | Path, test_file: str | None, image_path: str | None) -> dict:
    """test_file, image_path, csv_encoding and max_seq_length: from the command line, else from the
    model's toolkit_args.json (a trained model's output directory evaluates with no other flags)."""
    recorded = training_data_args(model_dir)
    if test_file is None:
        test_file = recorded.get("test_file")
        if not test_file:
            raise InputError(
                f"no --test_file given, and {Path(model_dir) / ARGS_FILE} names none; pass --test_file"
            )
        image_path = image_path or recorded.get("image_path")
    return {
        "test_file": test_file,
        "image_path": image_path,
        "csv_encoding": recorded.get("csv_encoding") if test_file == recorded.get("test_file") else None,
        "max_seq_length": recorded.get("max_seq_length"),
    }


def format_report(results: dict) -> str:
    """The metrics as aligned "name  value" lines, one block per group."""
    lines = []
    for group, metrics in results.items():
        if not isinstance(metrics, dict):
            lines.append(f"{group}: {metrics}")
            continue
        lines.append(f"{group}:")
        width = max(len(name) for name in metrics)
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {name:<{width}}  {shown}")
    return "\n".join(lines)
