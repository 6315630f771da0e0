"""The model card (README.md) a finished run leaves beside its final model, in the Hugging Face layout:
YAML front matter, then the towers, the data, the arguments and the final metrics."""

from pathlib import Path

from datatools.atomic import atomic_file

FRONT_MATTER = """---
language: zh
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags:
- clip
- chinese-clip
- bert-clip
- image-text-retrieval
---
"""
KEY_TRAINING_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay", "bf16",
    "fp16", "seed",
)  # fmt: skip


def table(rows: list[tuple[str, object]], header: tuple[str, str] = ("key", "value")) -> list[str]:
    """A two-column Markdown table."""
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return lines + [f"| `{key}` | {value} |" for key, value in rows]


def towers_section(record: dict, model_config) -> list[str]:
    """Where the image and text towers came from, and the shared embedding size."""
    model = record["model"]
    if model.get("model_name_or_path"):
        sources = [f"- continued from `{model['model_name_or_path']}`"]
    else:
        sources = [f"- image tower: `{model['clip_pretrain_path']}` (CLIP vision model)",
                   f"- text tower: `{model['text_pretrain_path']}`"]  # fmt: skip
    text, vision = model_config.text_config, model_config.vision_config
    return ["## Towers", "", *sources,
            f"- text pooling: `{model['text_pooling']}`; projection dim {model_config.projection_dim}",
            f"- image size {vision.image_size} px, patch {vision.patch_size}; text hidden size "
            f"{text.hidden_size}, {text.num_hidden_layers} layers", ""]  # fmt: skip


def model_card(record: dict, model_config, row_counts: dict[str, int], metrics: dict, world_size: int) -> str:
    """The README.md text.

    record: the arguments record (component.training.run_output.arguments_record);
    row_counts: data file -> rows.
    """
    training = record["training"]
    toolkit = [(f"{group}.{key}", f"`{value!r}`") for group in ("model", "data", "tower")
               for key, value in record[group].items()]  # fmt: skip
    batch = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] * world_size
    lines = [
        FRONT_MATTER,
        "# Chinese CLIP (BertCLIP)",
        "",
        "An image tower and a Chinese text tower trained contrastively with this toolkit's "
        "`train_clip.py`. Score images against texts with",
        "",
        "```",
        "python predict_similarity.py --model_name_or_path THIS_DIRECTORY \\",
        "    --images cat.jpg --texts 一只猫 一只狗",
        "```",
        "",
        *towers_section(record, model_config),
        "## Data",
        "",
        *table([(path, f"{count:,} rows") for path, count in row_counts.items()], ("file", "rows")),
        "",
        "## Arguments",
        "",
        f"Global batch size {batch} ({world_size} process(es)); every value is in `toolkit_args.json`.",
        "",
        *table([*toolkit, *((key, f"`{training[key]!r}`") for key in KEY_TRAINING_ARGS if key in training)]),
        "",
        "## Final metrics",
        "",
        *table(
            [(key, f"{value:.4f}" if isinstance(value, float) else value) for key, value in metrics.items()],
            ("metric", "value"),
        ),
        "",
        "![training curves](training_curves.png)",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path, text: str) -> None:
    """Write README.md into `output_dir` atomically."""
    with atomic_file(Path(output_dir) / "README.md", "w") as file:
        file.write(text)
