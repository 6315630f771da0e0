"""The one place where raw samples become tensors."""

from dataclasses import dataclass

import numpy as np
import torch

from component.processor import ImageTransform, tokenize


@dataclass
class ImageTextCollator:
    """Tokenise captions and normalise images for a batch of `ImageTextDataset` samples."""

    processor: object
    transform: ImageTransform
    max_seq_length: int = 64

    def __call__(self, samples: list[dict]) -> dict:
        batch = tokenize(self.processor, [s["text"] for s in samples], self.max_seq_length)
        if "image_features" in samples[0]:  # LiT with cached image features: no pixels at all
            batch["image_features"] = torch.from_numpy(np.stack([s["image_features"] for s in samples]))
        else:
            batch["pixel_values"] = self.transform.to_pixel_values([s["image"] for s in samples])
        batch["sample_index"] = torch.tensor([s["index"] for s in samples])
        batch["bad_images"] = [message for s in samples for message in s["bad_images"]]
        return batch
