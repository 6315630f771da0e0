"""Webdataset shards as training and test data.

`ShardStream` streams training samples: shards shuffled per epoch and split across ranks and
DataLoader workers, a sample shuffle buffer, every rank the same number of batches, bad samples
replaced by the next usable one. Its order is a pure function of (seed, epoch, rank, worker), so a
resumed run fast-forwards to its position without reading a skipped image (docs/data_at_scale.md).

`TarSource` indexes a test set's shards once into compact arrays: a map-style source, so that
evaluation and the feature cache treat shards exactly like CSV rows.
"""

import hashlib
import io
import logging
import math
import multiprocessing
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from component.processor import ImageTransform
from component.training.dataset import (
    BadImageError,
    DataError,
    ImageTextRows,
    StringColumn,
    describe_load_error,
)
from datatools.shards import ShardError, TarSample, iter_tar_samples, read_member

logger = logging.getLogger(__name__)

MAX_REPLACEMENT_TRIES = 100


class TarSource:
    """The usable samples of some shards as a map-style `ImageTextSource` (for test sets).

    `image_key` is a digest of the image's bytes, so samples sharing an image count as one image.
    `rows` holds the captions and image keys as a CSV source's rows hold texts and filenames.
    """

    def __init__(self, shards: list[Path], name: str):
        self.name = name
        self.shards = shards
        self.skipped: list[str] = []
        columns, where, keys = [], [], []
        for shard_number, shard in enumerate(shards):
            for sample in iter_tar_samples(shard):
                if sample.problem:
                    self.skipped.append(f"{shard}:{sample.key}: {sample.problem}")
                    continue
                offset, size = sample.image_member()
                digest = hashlib.blake2b(read_member(shard, (offset, size)), digest_size=12).hexdigest()
                columns.append((sample.caption, digest))
                keys.append(sample.key)
                where.append((shard_number, offset, size))
        if not where:
            raise DataError(f"{name}: no usable sample (an image and a caption) in {len(shards)} shard(s)")
        if self.skipped:
            logger.warning(f"{name}: {len(self.skipped)} unusable sample(s) left out, the first "
                           f"{self.skipped[0]}")  # fmt: skip
        captions, image_keys = StringColumn.pack_pairs(columns)
        self.rows = ImageTextRows(captions, image_keys, name)
        self.sample_keys = StringColumn(keys)
        self.where = np.asarray(where, dtype=np.int64)  # [samples, (shard, offset, size)]

    def __len__(self) -> int:
        return len(self.where)

    def caption(self, index: int) -> str:
        return self.rows.texts[index]

    def sample_key(self, index: int) -> str:
        return self.sample_keys[index]

    def image_key(self, index: int) -> str:
        return self.rows.filenames[index]

    def open_image(self, index: int) -> io.BytesIO:
        shard, offset, size = (int(v) for v in self.where[index])
        return io.BytesIO(read_member(self.shards[shard], (offset, size)))

    def identity(self) -> bytes:
        keys = self.sample_keys
        return self.name.encode() + keys.buffer.tobytes() + keys.offsets.tobytes()


def shard_order(shard_count: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation, the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(shard_count)


def shards_of_slot(order: np.ndarray, slot: int, slots: int) -> list[int]:
    """Slot `slot`'s shards (slot = rank * workers + worker); with fewer shards than slots, a slot
    shares one shard with others."""
    count = len(order)
    return [int(order[j % count]) for j in range(slot, max(count, slot + 1), slots)]


def worker_batches(batches: int, worker: int, workers: int) -> int:
    """Worker `worker`'s share of a rank's batches; the DataLoader takes them round-robin."""
    return batches // workers + (1 if worker < batches % workers else 0)


def skipped_worker_batches(skip: int, worker: int, workers: int) -> int:
    """How many of the rank's first `skip` batches come from worker `worker` (round-robin)."""
    return max(0, math.ceil((skip - worker) / workers))


class ShardStream(IterableDataset):
    """Training samples from webdataset shards, `len(self)` per rank and epoch (a whole number of
    batches, the same on every rank).

    set_position(epoch, skip_batches) is called before each epoch (by `StreamPositionCallback`);
    the values live in shared memory, so DataLoader workers, persistent or not, read them.
    """

    def __init__(self, shards: list[Path], total_samples: int, transform: ImageTransform, *, name: str,
                 batch_size: int, seed: int, shuffle_buffer: int, rank: int = 0, world_size: int = 1,
                 draft: bool = True):  # fmt: skip
        self.shards, self.name, self.transform, self.draft = shards, name, transform, draft
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.batches = total_samples // (world_size * batch_size)
        if self.batches == 0:
            raise DataError(f"{name}: {total_samples} samples are fewer than one batch of "
                            f"{batch_size} on each of {world_size} process(es)")  # fmt: skip
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._skip = multiprocessing.Value("q", 0, lock=False)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self._epoch.value, self._skip.value = epoch, skip_batches

    @property
    def source(self) -> "ShardStream":
        """The stream names itself (`name`) as a source does."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Accelerate's hook; the position (with its skip) is set by `set_position`."""

    def candidates(self, epoch: int, slot: int, slots: int) -> Iterator[TarSample]:
        """This slot's samples for the epoch, shuffled through the buffer; endless (it cycles its
        shards), so every slot fills its quota however uneven the shards are."""
        rng = np.random.default_rng([self.seed, epoch, slot])
        mine = shards_of_slot(shard_order(len(self.shards), self.seed, epoch), slot, slots)
        buffer: list[TarSample] = []
        while True:
            usable = 0
            for shard in mine:
                for sample in self.samples_of(self.shards[shard]):
                    usable += sample.problem is None
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    pick = int(rng.integers(len(buffer)))
                    buffer[pick], sample = sample, buffer[pick]
                    yield sample
            if not usable:
                names = ", ".join(str(self.shards[s]) for s in mine[:3])
                raise DataError(f"{names}: no usable sample (an image and a caption) in these shards")

    @staticmethod
    def samples_of(shard: Path) -> Iterator[TarSample]:
        """A shard's samples; a shard that cannot be read (not a tar, no permission) is one bad
        sample, counted like a bad image, and the stream goes on."""
        try:
            yield from iter_tar_samples(shard)
        except ShardError as error:
            yield TarSample(shard, "(whole shard)", problem=str(error))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = self._epoch.value, self._skip.value
        quota = worker_batches(self.batches, worker, workers) * self.batch_size
        skipped = min(quota, skipped_worker_batches(skip, worker, workers) * self.batch_size)
        ahead: deque[TarSample] = deque()
        stream = self.candidates(epoch, self.rank * workers + worker, self.world_size * workers)
        for position in range(quota):
            if not ahead:
                ahead.append(next(stream))
            if position < skipped:  # fast-forward: no image is read
                ahead.popleft()
                yield {"skipped": True}
                continue
            yield self.sample(ahead, stream)
            ahead.popleft()

    def sample(self, ahead: deque, stream: Iterator[TarSample]) -> dict:
        """The sample at the head of `ahead`, else the next usable one (peeked, not consumed, so
        the stream's position never depends on which images failed)."""
        bad_images = []
        for tries in range(MAX_REPLACEMENT_TRIES):
            if tries >= len(ahead):
                ahead.append(next(stream))
            candidate = ahead[tries]
            try:
                image = self.load(candidate)
            except Exception as error:  # any undecodable image; never crash a long run
                if tries == 0:  # counted once, where it is the sample itself
                    bad_images.append(f"{candidate.shard}:{candidate.key}: {describe_load_error(error)}")
                continue
            return {"text": candidate.caption, "image": image, "index": -1, "key": candidate.key,
                    "bad_images": bad_images}  # fmt: skip
        raise BadImageError(f"{self.name}: {MAX_REPLACEMENT_TRIES} samples in a row could not be used")

    def load(self, sample: TarSample) -> np.ndarray:
        if sample.problem:
            raise ValueError(sample.problem)
        data = read_member(sample.shard, sample.image_member())
        return self.transform(self.transform.load(io.BytesIO(data), draft=self.draft))
