"""The peer: Hugging Face's run_clip recipe, per-item image processing with the stock Trainer.

As in transformers' examples/pytorch/contrastive-image-text/run_clip.py: a
VisionTextDualEncoderModel from a CLIP and a BERT checkpoint, each sample opened in full and
run through the image processor and the tokenizer (padded to max_length) on its own, stacked
by the collate function, trained by the stock Trainer. The image processor is CLIP's own PIL
one (run_clip uses torchvision transforms, which this project does not install).
"""

import contextlib
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from component.training.dataset import read_image_text_csv
from component.training.freezing import lock_vision_tower


class PerItemProcessorDataset(Dataset):
    """Open the full image with PIL, then run the image processor and the tokenizer, per sample."""

    def __init__(self, paths: list[Path], texts: list[str], processor, max_seq_length: int):
        self.paths = paths
        self.texts = texts
        self.processor = processor
        self.max_seq_length = max_seq_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            pixel_values = self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
        tokens = self.processor.tokenizer(
            self.texts[index], padding="max_length", truncation=True, max_length=self.max_seq_length
        )
        return {
            "pixel_values": pixel_values["pixel_values"][0],  # [3, height, width]
            "input_ids": torch.tensor(tokens["input_ids"]),
            "attention_mask": torch.tensor(tokens["attention_mask"]),
        }


def run_clip_processor(clip_dir: Path, bert_dir: Path) -> VisionTextDualEncoderProcessor:
    image_processor = AutoImageProcessor.from_pretrained(str(clip_dir), backend="pil")
    return VisionTextDualEncoderProcessor(image_processor, AutoTokenizer.from_pretrained(str(bert_dir)))


def run_clip_dataset(csv_path: Path, image_dir: Path, processor, max_seq_length: int) -> Dataset:
    """The rows of a training CSV, processed per item."""
    rows = read_image_text_csv(csv_path)
    paths = [image_dir / name for name in rows.filenames.tolist()]
    return PerItemProcessorDataset(paths, rows.texts.tolist(), processor, max_seq_length)


def run_clip_collate(samples: list[dict]) -> dict:
    """run_clip's collate_fn: stack the per-item tensors and ask the model for its loss."""
    return {**default_collate(samples), "return_loss": True}


def train_run_clip(
    clip_dir: Path,
    bert_dir: Path,
    dataset: Dataset,
    training_args: TrainingArguments,
    projection_dim: int,
    callbacks: list,
) -> dict:
    """Train run_clip's model with the image tower locked (as LiT here); the Trainer's metrics."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the benchmark's JSON
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            str(clip_dir), str(bert_dir), projection_dim=projection_dim
        )
        lock_vision_tower(model)  # run_clip's --freeze_vision_model, and the projection as in LiT here
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          data_collator=run_clip_collate, callbacks=callbacks)  # fmt: skip
        return trainer.train().metrics
