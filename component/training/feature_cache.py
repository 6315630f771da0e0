"""LiT with a locked image tower: compute each image embedding once, keep it on disk, reuse it.

The cache is a memory-mapped float16 array of projected (not normalised) image features, one
row per sample of a map-style source, plus a mask of rows whose image failed to load. Its name
is a hash of the image tower's weights, the preprocessing and the source's image list, so a
changed model or CSV gets a new cache.

Under torchrun every process computes one contiguous share of the rows and saves it as a part
file; the first process joins the parts. A part survives an interruption and is not computed again.
"""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from component.training.dataset import BadImageError, ImageTextDataset, coprime_stride
from component.training.sources import ImageTextSource
from datatools.atomic import atomic_file, write_json_atomic

logger = logging.getLogger(__name__)


def image_tower_hash(model):
    """A SHA-256 object fed with the image tower's and image projection's weights."""
    digest = hashlib.sha256()
    image_side = {
        k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_proj"))
    }
    for name, tensor in sorted(image_side.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest


def cache_key(model, dataset: ImageTextDataset, tower_hash=None) -> str:
    """A hash of everything that decides the cached values; `tower_hash`, `image_tower_hash(model)`
    when the caller has it already (it reads every weight of the tower)."""
    digest = (tower_hash or image_tower_hash(model)).copy()
    digest.update(repr((dataset.transform, dataset.draft)).encode())
    digest.update(dataset.source.identity())
    return digest.hexdigest()[:24]


class _RowImages(Dataset):
    """Each row's image as a uint8 array, or None when it does not load (no replacement here)."""

    def __init__(self, dataset: ImageTextDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset.load_image(index)
        except Exception:  # counted as a bad row, exactly as the uncached path would
            return index, None


def _collate(items):
    indices = [i for i, image in items if image is not None]
    images = [image for _, image in items if image is not None]
    return indices, images


@dataclass(frozen=True)
class Shard:
    """This process's share of the rows, and a barrier across the processes that build one cache."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    def rows(self, count: int) -> range:
        """A contiguous range; the ranges of all ranks cover `count` rows once."""
        return range(count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size)


@torch.inference_mode()
def compute_image_features(model, dataset: ImageTextDataset, batch_size: int, num_workers: int, device,
                           rows: range | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Projected features [len(rows), dim] (float16) of `rows` (default: all), and a mask of the rows
    whose image loaded."""
    rows = rows if rows is not None else range(len(dataset))
    features = np.zeros((len(rows), model.config.projection_dim), dtype=np.float16)
    valid = np.zeros(len(rows), dtype=bool)
    loader = DataLoader(
        Subset(_RowImages(dataset), rows), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    use_bf16 = torch.device(device).type == "cuda"
    was_training = model.training
    model.eval()
    for indices, images in tqdm(loader, desc="caching image features", unit="batch"):
        if not indices:
            continue
        positions = np.asarray(indices) - rows.start
        pixel_values = dataset.transform.to_pixel_values(images, device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
            batch_features = model.get_image_features(pixel_values)
        features[positions] = batch_features.float().cpu().numpy()
        valid[positions] = True
    model.train(was_training)
    return features, valid


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as file:
        np.savez(file, **arrays)


def _join_parts(parts: list[Path], dim: int, features_path: Path, valid_path: Path) -> np.ndarray:
    """Write the parts' features, in order, as one .npy file, holding one part in memory at a time."""
    valid = np.concatenate([np.load(part)["valid"] for part in parts])  # reads only that member
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (len(valid), dim)}  # fmt: skip
    with atomic_file(features_path) as file:
        np.lib.format.write_array_header_1_0(file, header)
        for part in parts:
            with np.load(part) as arrays:
                file.write(np.ascontiguousarray(arrays["features"], dtype=np.float16).tobytes())
    with atomic_file(valid_path) as file:
        np.save(file, valid)
    return valid


def load_or_build_cache(
    model,
    dataset: ImageTextDataset,
    cache_dir: str | Path,
    batch_size: int,
    num_workers: int,
    device,
    shard: Shard | None = None,
    tower_hash=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The cached features and valid mask for `dataset`, computed on first use.

    Every process that shares the cache calls this with its `shard` (default: a single process);
    each computes its own rows. `tower_hash`: see `cache_key`.
    """
    shard = shard or Shard()
    cache_dir = Path(cache_dir)
    key = cache_key(model, dataset, tower_hash)
    features_path, valid_path = cache_dir / f"{key}.features.npy", cache_dir / f"{key}.valid.npy"
    meta_path = cache_dir / f"{key}.json"
    if meta_path.is_file():  # the metadata is written last: its presence marks a complete cache
        logger.info(f"reusing cached image features {features_path}")
        return np.load(features_path, mmap_mode="r"), np.load(valid_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts = [cache_dir / f"{key}.part-{rank}-of-{shard.world_size}.npz" for rank in range(shard.world_size)]
    if not parts[shard.rank].is_file():  # else computed before an interruption
        rows = shard.rows(len(dataset))
        features, valid = compute_image_features(model, dataset, batch_size, num_workers, device, rows)
        _save_arrays(parts[shard.rank], features=features, valid=valid)
    shard.barrier()
    if shard.rank == 0:
        missing = [str(part) for part in parts if not part.is_file()]
        if missing:
            raise RuntimeError(f"cache parts {missing} are missing: under torchrun on several machines, "
                               "output_dir must be on a file system that all of them share")  # fmt: skip
        valid = _join_parts(parts, model.config.projection_dim, features_path, valid_path)
        meta = {"rows": len(dataset), "dim": model.config.projection_dim, "bad_rows": int((~valid).sum()),
                "source": dataset.source.name}  # fmt: skip
        write_json_atomic(meta_path, meta)
        for part in cache_dir.glob(f"{key}.part-*.npz"):
            part.unlink()
        logger.info(f"cached {len(dataset)} image features in {features_path}")
    shard.barrier()
    return np.load(features_path, mmap_mode="r"), np.load(valid_path)


class CachedImageTextDataset(Dataset):
    """Like ImageTextDataset, but each sample carries its cached image features instead of pixels."""

    def __init__(self, source: ImageTextSource, features: np.ndarray, valid: np.ndarray):
        if not valid.any():
            raise BadImageError(f"{source.name}: no image could be loaded; is image_path right?")
        self.source = source
        self.features = features
        self.valid = valid
        self.replacement_stride = coprime_stride(len(source))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        # The same replacement rule as ImageTextDataset, so cached and uncached runs see the same pairs.
        bad_images, candidate, stride = [], index, self.replacement_stride
        while not self.valid[candidate]:
            bad_images.append(f"{self.source.image_key(candidate)}: failed to load when caching features")
            candidate = (candidate + stride) % len(self)
        return {
            "text": self.source.caption(candidate),
            "image_features": np.asarray(self.features[candidate], dtype=np.float32),
            "index": candidate,
            "bad_images": bad_images,
        }
