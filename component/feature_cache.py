"""LiT with a locked image tower: compute each image embedding once, keep it on disk, reuse it.

The cache is a memory-mapped float16 array of projected (not normalised) image features, one
row per CSV row, plus a mask of rows whose image failed to load. Its name is a hash of the image
tower's weights, the preprocessing and the image list, so a changed model or CSV gets a new cache.
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from component.dataset import ImageTextDataset, ImageTextRows, coprime_stride
from datatools.atomic import atomic_file, write_json_atomic

logger = logging.getLogger(__name__)


def cache_key(model, dataset: ImageTextDataset) -> str:
    """A hash of everything that decides the cached values."""
    digest = hashlib.sha256()
    image_side = {
        k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_proj"))
    }
    for name, tensor in sorted(image_side.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(repr((dataset.transform, dataset.draft, str(dataset.image_path.resolve()))).encode())
    digest.update(dataset.rows.filenames.buffer.tobytes())
    digest.update(dataset.rows.filenames.offsets.tobytes())
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
    bad = [i for i, image in items if image is None]
    return indices, images, bad


@torch.inference_mode()
def compute_image_features(model, dataset: ImageTextDataset, batch_size: int, num_workers: int, device):
    """Projected features [rows, dim] (float16) and a mask of rows whose image loaded."""
    features = np.zeros((len(dataset), model.config.projection_dim), dtype=np.float16)
    valid = np.zeros(len(dataset), dtype=bool)
    loader = DataLoader(
        _RowImages(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    use_bf16 = torch.device(device).type == "cuda"
    was_training = model.training
    model.eval()
    for indices, images, _ in tqdm(loader, desc="caching image features", unit="batch"):
        if not indices:
            continue
        pixel_values = dataset.transform.to_pixel_values(images, device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
            batch_features = model.get_image_features(pixel_values)
        features[indices] = batch_features.float().cpu().numpy()
        valid[indices] = True
    model.train(was_training)
    return features, valid


def load_or_build_cache(model, dataset: ImageTextDataset, cache_dir: str | Path, batch_size: int,
                        num_workers: int, device) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The cached features and valid mask for `dataset`, computed on first use."""
    cache_dir = Path(cache_dir)
    key = cache_key(model, dataset)
    features_path, valid_path = cache_dir / f"{key}.features.npy", cache_dir / f"{key}.valid.npy"
    meta_path = cache_dir / f"{key}.json"
    if not meta_path.is_file():  # the metadata is written last: its presence marks a complete cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        features, valid = compute_image_features(model, dataset, batch_size, num_workers, device)
        for path, array in ((features_path, features), (valid_path, valid)):
            with atomic_file(path) as file:
                np.save(file, array)
        meta = {"rows": len(dataset), "dim": features.shape[1], "bad_rows": int((~valid).sum()),
                "source": dataset.rows.source}  # fmt: skip
        write_json_atomic(meta_path, meta)
        logger.info(f"cached {len(dataset)} image features in {features_path}")
    else:
        logger.info(f"reusing cached image features {features_path}")
    return np.load(features_path, mmap_mode="r"), np.load(valid_path)


class CachedImageTextDataset(Dataset):
    """Like ImageTextDataset, but each sample carries its cached image features instead of pixels."""

    def __init__(self, rows: ImageTextRows, features: np.ndarray, valid: np.ndarray):
        if not valid.any():
            raise RuntimeError(f"{rows.source}: no image could be loaded; is image_path right?")
        self.rows = rows
        self.features = features
        self.valid = valid
        self.replacement_stride = coprime_stride(len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        # The same replacement rule as ImageTextDataset, so cached and uncached runs see the same pairs.
        bad_images, candidate, stride = [], index, self.replacement_stride
        while not self.valid[candidate]:
            bad_images.append(f"{self.rows.filenames[candidate]}: failed to load when caching features")
            candidate = (candidate + stride) % len(self)
        return {
            "text": self.rows.texts[candidate],
            "image_features": np.asarray(self.features[candidate], dtype=np.float32),
            "index": candidate,
            "bad_images": bad_images,
        }
