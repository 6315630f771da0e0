"""One processor (the text tower's tokenizer + CLIP image processor) and the shared encoding helpers."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ChineseCLIPProcessor,
    PreTrainedTokenizerFast,
    VisionTextDualEncoderProcessor,
)
from transformers.image_processing_base import ImageProcessingMixin

from component.errors import CheckpointError
from datatools.images import MAX_PIXELS, load_rgb


def build_processor(clip_path: str | Path, text_path: str | Path) -> VisionTextDualEncoderProcessor:
    """The tokenizer of the text tower's checkpoint (any, through AutoTokenizer) and the image
    processor of the CLIP checkpoint."""
    image_processor = AutoImageProcessor.from_pretrained(str(clip_path), backend="pil")
    tokenizer = load_tokenizer(text_path)
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
# Image backends that older versions of this toolkit passed on to the tokenizer, which saved them.
_IMAGE_BACKENDS = ("pil", "torchvision")


def load_processor(path: str | Path) -> VisionTextDualEncoderProcessor | ChineseCLIPProcessor:
    """The processor saved beside a checkpoint: ours, ChineseCLIP's own, or the original CLIP-Chinese's.

    Built from its two parts rather than through `AutoProcessor`, so that a processor class or an
    image processor type that transformers no longer knows (CLIPProcessor with a BERT tokenizer,
    CLIPFeatureExtractor) still loads. Raises `CheckpointError` naming what is missing or broken.
    """
    _check_processor_saved(path)
    image_processor = load_image_processor(path)
    tokenizer = load_tokenizer(path)
    if type(image_processor).__name__.startswith("ChineseCLIP"):
        return ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _check_processor_saved(path: str | Path) -> None:
    directory = Path(path)
    if not directory.is_dir():
        return  # a hub name: transformers says what it cannot find
    has_image_processor = any((directory / name).is_file() for name in IMAGE_PROCESSOR_FILES)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    missing = [
        what
        for what, present in (("tokenizer", has_tokenizer), ("image processor", has_image_processor))
        if not present
    ]
    if missing:
        raise CheckpointError(
            f"{directory}: no {' or '.join(missing)} saved beside the model (looked for "
            f"{', '.join(TOKENIZER_FILES + IMAGE_PROCESSOR_FILES)}); save the processor into the "
            "checkpoint with processor.save_pretrained(directory)"
        )


def load_image_processor(path: str | Path):
    """The image processor saved in a checkpoint directory (or hub repo), with the PIL backend.

    A `*FeatureExtractor` type, which transformers 5 removed (checkpoints saved by transformers 4
    say "CLIPFeatureExtractor"), becomes its `*ImageProcessor` class, built from the saved settings;
    the checkpoint itself is never rewritten.
    """
    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(str(path))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read the saved image processor ({error})") from error
    type_name = settings.get("image_processor_type") or settings.get("feature_extractor_type") or ""
    try:
        if not type_name.endswith("FeatureExtractor"):
            return AutoImageProcessor.from_pretrained(str(path), backend="pil")
        class_name = type_name.removesuffix("FeatureExtractor") + "ImageProcessor"
        image_processor_class = getattr(transformers, f"{class_name}Pil", None) or getattr(
            transformers, class_name, None
        )
        if image_processor_class is None:
            raise ValueError(f"transformers has no {class_name} to replace the removed {type_name}")
        legacy_keys = ("image_processor_type", "feature_extractor_type", "processor_class", "auto_map")
        return image_processor_class.from_dict({k: v for k, v in settings.items() if k not in legacy_keys})
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: cannot load the saved image processor ({error})") from error


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a checkpoint directory (or hub repo)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot load the saved tokenizer ({error})") from error
    if tokenizer.init_kwargs.get("backend") in _IMAGE_BACKENDS:
        # Saved by an older version of this toolkit; "backend" names the tokenizer's own backend.
        del tokenizer.init_kwargs["backend"]
        tokenizer.backend = "tokenizers" if isinstance(tokenizer, PreTrainedTokenizerFast) else None
        if tokenizer.backend:
            tokenizer.init_kwargs["backend"] = tokenizer.backend
    return tokenizer


def check_tokenizer_fits(tokenizer, model, source: str | Path) -> None:
    """Refuse a tokenizer that can produce ids beyond the text tower's embedding table."""
    vocab_size = model.config.text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is "
            f"{vocab_size}; use the tokenizer saved with this model (or its text tower's checkpoint)"
        )


def tokenize(processor, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise texts for the text tower: padded to the longest, truncated to `max_length`."""
    return processor.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).data


@dataclass(frozen=True)
class ImageTransform:
    """The image processor's resize, crop and normalisation, split for speed.

    `load` and `__call__` run per image (in DataLoader workers) and give small uint8 arrays;
    `to_pixel_values` normalises a whole batch at once. With `draft=True`, JPEGs much larger
    than needed are decoded at a reduced scale (PIL draft mode), which is several times faster.
    """

    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio
    resize_to: tuple[int, int] | None  # or resize to exactly (height, width)
    crop: tuple[int, int] | None  # then centre-crop to (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int

    @classmethod
    def from_processor(cls, processor) -> "ImageTransform":
        ip = getattr(processor, "image_processor", processor)
        size = dict(ip.size)
        crop = dict(ip.crop_size or {}) if ip.do_center_crop else {}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            resize_to=(size["height"], size["width"]) if size.get("height") else None,
            crop=(crop["height"], crop["width"]) if crop.get("height") else None,
            mean=tuple(ip.image_mean),
            std=tuple(ip.image_std),
            resample=int(ip.resample),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel values."""
        return self.crop or self.resize_to or (self.shortest_edge, self.shortest_edge)

    def load(self, path: str | Path, draft: bool = True, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """Open, fully decode and orient an image file as RGB (`datatools.images.load_rgb`).

        Only regular files are read, and an image with more than `max_pixels` pixels to decode
        (after draft mode) is refused before decoding. Raises `RejectedError` with the reason.
        """
        return load_rgb(path, max_pixels, draft_size=self._draft_size if draft else None)

    def _draft_size(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        if self.resize_to:
            return self.resize_to[1], self.resize_to[0]
        scale = self.shortest_edge / min(width, height)
        return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Resize and crop an RGB image to a uint8 array [height, width, 3]."""
        width, height = image.size
        if self.resize_to:
            new_height, new_width = self.resize_to
        elif width <= height:  # the same rounding as transformers' get_resize_output_image_size
            new_width, new_height = self.shortest_edge, int(self.shortest_edge * height / width)
        else:
            new_width, new_height = int(self.shortest_edge * width / height), self.shortest_edge
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), resample=self.resample)
        array = np.asarray(image, dtype=np.uint8)
        if self.crop:
            crop_height, crop_width = self.crop
            top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
            array = array[top : top + crop_height, left : left + crop_width]
        return np.ascontiguousarray(array)

    def to_pixel_values(
        self, arrays: list[np.ndarray] | torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Normalise uint8 images [batch, height, width, 3] to pixel values [batch, 3, height, width].

        The uint8 batch moves to `device` (default: where it is) before normalising: a quarter of
        the bytes of float pixels cross to a GPU, and the arithmetic runs there.
        """
        batch = arrays if isinstance(arrays, torch.Tensor) else torch.from_numpy(np.stack(arrays))
        batch = batch.to(device) if device is not None else batch
        # One copy into contiguous float NCHW, then one fused multiply-add: (x / 255 - mean) / std.
        pixels = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, pixels, 1.0 / (255.0 * std))


def preprocess_images(processor, images: list[Image.Image]) -> torch.Tensor:
    """Pixel values [batch, 3, height, width] for PIL images, the same as the processor's own."""
    transform = ImageTransform.from_processor(processor)
    return transform.to_pixel_values([transform(image.convert("RGB")) for image in images])
