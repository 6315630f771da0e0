"""The one place where raw samples become tensors."""

from dataclasses import dataclass

import numpy as np
import torch

from component.processor import ImageTransform, tokenize


@dataclass
class ImageTextCollator:
    """Tokenise captions and stack images for a batch of `ImageTextDataset` samples.

    Images leave as uint8 `image_uint8` [batch, height, width, 3]: a quarter of the bytes of float
    pixels through worker shared memory and to the GPU. `model_inputs` normalises them to
    `pixel_values` once the batch is on its device.
    """

    processor: object
    transform: ImageTransform
    max_seq_length: int = 64

    def __call__(self, samples: list[dict]) -> dict:
        if samples[0].get("skipped"):  # a batch a resumed stream fast-forwards past: never used
            return {"skipped": torch.ones(len(samples))}
        batch = tokenize(self.processor, [s["text"] for s in samples], self.max_seq_length)
        if "image_features" in samples[0]:  # LiT with cached image features: no pixels at all
            batch["image_features"] = torch.from_numpy(np.stack([s["image_features"] for s in samples]))
        else:
            batch["image_uint8"] = torch.from_numpy(np.stack([s["image"] for s in samples]))
        batch["sample_index"] = torch.tensor([s["index"] for s in samples])
        batch["bad_images"] = [message for s in samples for message in s["bad_images"]]
        return batch

    def model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor | None, list[str]]:
        """The model's keyword arguments from a collated batch (on any device), with the batch's
        sample indices and bad-image messages taken out."""
        inputs = dict(batch)
        bad_images = inputs.pop("bad_images", [])
        sample_index = inputs.pop("sample_index", None)
        if "image_uint8" in inputs:
            inputs["pixel_values"] = self.transform.to_pixel_values(inputs.pop("image_uint8"))
        return inputs, sample_index, bad_images
