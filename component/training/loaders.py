"""Data sources by name, and the DataLoaders that make training resume exactly.

`build_dataset` dispatches a train_file/test_file value to the CSV path or to webdataset shards
(as open_clip's `get_dataset_fn` does). `DataLoaderMixin` gives the Trainer a train DataLoader
with its own seeded generator (workers never draw from the global RNG, so a resumed run's dropout
matches), and a plain per-rank DataLoader for a shard stream. `StreamPositionCallback` tells a
stream its epoch and how many batches a resumed epoch skips, and records the shard list in each
checkpoint. The design is in docs/data_at_scale.md.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import TrainerCallback

from component.evaluation.eval_data import CnClipSource
from component.evaluation.metrics import group_by_caption, retrieval_metrics
from component.processor import ImageTransform
from component.training.dataset import DataError, ImageTextDataset
from component.training.row_store import load_rows
from component.training.shards import ShardStream, TarSource
from datatools.atomic import write_json_atomic
from datatools.data_kind import data_kind
from datatools.shards import list_shards, shard_sizes

logger = logging.getLogger(__name__)

SHARD_LIST_FILE = "train_shards.json"  # in each checkpoint of a shard run


def epoch_samples(spec: str, shards: list[Path], num_train_samples: int | None, cache_dir: Path) -> int:
    """An epoch's samples: num_train_samples when given, else sizes.json, else the shards' own
    counts (counted once, cached in `cache_dir`)."""
    if num_train_samples:
        return num_train_samples
    total = sum(shard_sizes(shards, cache_dir / "shard_counts.json"))
    if not total:
        raise DataError(f"{spec}: the shards hold no samples")
    return total


def build_dataset(spec: str, data_args, transform: ImageTransform, training_args, stream: bool):
    """The dataset a train_file/test_file value names: Chinese-CLIP data (a *_texts.jsonl or an LMDB),
    a CSV (rows through the row store), or shards: a stream when `stream` (training), else an index
    (a test set, or cached image features)."""
    cache_dir = Path(training_args.output_dir) / "data_cache"
    kind = data_kind(spec)
    if kind == "cn_clip":
        return ImageTextDataset(CnClipSource(spec), transform=transform, draft=data_args.draft_decode)
    if kind == "csv":
        rows = load_rows(spec, data_args.csv_encoding, cache_dir, process_index=training_args.process_index)
        return ImageTextDataset(rows, data_args.image_path, transform, draft=data_args.draft_decode)
    shards = list_shards(spec)
    if not stream:
        return ImageTextDataset(TarSource(shards, spec), transform=transform, draft=data_args.draft_decode)
    total = epoch_samples(spec, shards, data_args.num_train_samples, cache_dir)
    return ShardStream(
        shards, total, transform, name=spec, batch_size=training_args.per_device_train_batch_size,
        seed=training_args.seed, shuffle_buffer=data_args.shuffle_buffer, rank=training_args.process_index,
        world_size=training_args.world_size, draft=data_args.draft_decode,
    )  # fmt: skip


class EpochPermutation(Sampler):
    """A random order of `count` indices per epoch, from (seed, epoch), held as one numpy array.

    torch's RandomSampler turns its permutation into a Python list: about 45 bytes per row,
    450 MB in every process for 10M rows; this holds 4 or 8 bytes per row and never the global RNG.
    """

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        order = order.astype(np.int32) if self.count < 2**31 else order
        for start in range(0, self.count, 1 << 16):
            yield from order[start : start + (1 << 16)].tolist()


class DataLoaderMixin:
    """Train DataLoaders for `CLIPTrainer` (put it first among the bases)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "random" or isinstance(dataset, ShardStream):
            return super()._get_train_sampler(train_dataset)
        return EpochPermutation(
            len(dataset), self.args.data_seed if self.args.data_seed is not None else self.args.seed
        )

    def get_train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed)
        if not isinstance(self.train_dataset, ShardStream):
            dataloader = super().get_train_dataloader()
            # The base seed of the workers comes from this generator, not from the global RNG that
            # dropout draws from (accelerate wraps the DataLoader it iterates in `base_dataloader`).
            getattr(dataloader, "base_dataloader", dataloader).generator = generator
            return dataloader
        # One plain DataLoader per rank: the stream splits shards across ranks itself, which
        # accelerate's wrappers would undo (they read every sample on each rank, or on rank 0).
        args = self.args
        return DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers else None,
            generator=generator,
        )  # fmt: skip


class StreamPositionCallback(TrainerCallback):
    """Before each epoch, tell the stream its epoch and the batches a resumed epoch has done."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        batches = len(train_dataloader) if train_dataloader is not None else self.stream.batches
        accumulation = args.gradient_accumulation_steps
        updates_per_epoch = batches // accumulation + int(batches % accumulation > 0)
        epoch, done = divmod(state.global_step, updates_per_epoch)
        self.stream.set_position(epoch, done * accumulation)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(checkpoint / SHARD_LIST_FILE, shard_record(self.stream))


def shard_record(stream: ShardStream) -> dict:
    """What a resume must find unchanged: the shard names, their sizes, and the epoch's length."""
    return {"shards": [str(s) for s in stream.shards], "bytes": [s.stat().st_size for s in stream.shards],
            "batches_per_rank": stream.batches}  # fmt: skip


def check_same_shards(checkpoint: str | None, stream) -> None:
    """Refuse to resume a shard run whose shard list or sizes changed since `checkpoint`."""
    if checkpoint is None or not isinstance(stream, ShardStream):
        return
    path = Path(checkpoint) / SHARD_LIST_FILE
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), shard_record(stream)
    if saved != now:
        changed = next((k for k in saved if saved[k] != now.get(k)), "shards")
        raise DataError(f"{stream.name}: the shards changed since {checkpoint} ({changed} differ); resume "
                        "needs the same shards, or start a new output_dir")  # fmt: skip


def dataset_retrieval_metrics(dataset, image_embeds, text_embeds, sample_index) -> dict[str, float]:
    """Retrieval metrics where samples with the same image key count as one image and samples with
    the same caption as one text, plus `images` and `texts`, the distinct counts; for any map-style
    source."""
    indices = [int(i) for i in sample_index]
    keys = [dataset.source.image_key(index) for index in indices]
    first_row_of: dict[str, int] = {}
    for row, key in enumerate(keys):
        first_row_of.setdefault(key, row)
    image_number = {key: number for number, key in enumerate(first_row_of)}
    captions = [dataset.source.caption(index) for index in indices]
    text_rows, text_to_images = group_by_caption(captions, [image_number[key] for key in keys])
    image_rows = list(first_row_of.values())
    metrics = retrieval_metrics(image_embeds[image_rows], text_embeds[text_rows], text_to_images)
    return {**metrics, "images": len(image_rows), "texts": len(text_rows)}
