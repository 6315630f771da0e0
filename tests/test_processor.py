"""The fast image path gives the same pixels as transformers' own image processor."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from component.processor import ImageTransform, load_processor, preprocess_images
from component.training.collator import ImageTextCollator
from datatools.images import RejectedError


@pytest.mark.parametrize("size", [(50, 40), (41, 97), (30, 30), (300, 200), (31, 45)])
def test_matches_the_clip_image_processor(tiny_checkpoint, size):
    image_processor = load_processor(tiny_checkpoint).image_processor
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_images(image_processor, [image]), expected, atol=1e-5, rtol=0)


def test_matches_a_squashing_processor_without_crop():
    image_processor = CLIPImageProcessorPil(size={"height": 30, "width": 30}, do_center_crop=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 50, 3), dtype=np.uint8))
    expected = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_images(image_processor, [image]), expected, atol=1e-5, rtol=0)
    assert ImageTransform.from_processor(image_processor).output_size == (30, 30)


def test_collated_uint8_batch_becomes_the_processors_pixel_values(tiny_checkpoint):
    processor = load_processor(tiny_checkpoint)
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 50), (90, 33))
    ]
    transform = ImageTransform.from_processor(processor)
    collator = ImageTextCollator(processor, transform, max_seq_length=8)
    texts = ["红色", "蓝色的圆"]
    samples = [{"text": t, "image": transform(im), "index": i, "bad_images": []}
               for i, (t, im) in enumerate(zip(texts, images, strict=True))]  # fmt: skip
    batch = collator(samples)
    assert batch["image_uint8"].dtype == torch.uint8  # a quarter of the bytes of float pixels
    inputs, sample_index, bad_images = collator.model_inputs(batch)
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected, atol=1e-5, rtol=0)
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values"}
    assert sample_index.tolist() == [0, 1] and bad_images == []


def test_exif_orientation_is_applied(tiny_checkpoint, tmp_path):
    image = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    image.save(tmp_path / "rotated.jpg", exif=exif)
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    assert transform.load(tmp_path / "rotated.jpg").size == (30, 60)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tiny_checkpoint, tmp_path):
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    Image.new("RGB", (200, 200), "red").save(tmp_path / "big.png")
    Image.new("RGB", (190, 190), "blue").save(tmp_path / "big.jpg")
    with pytest.raises(RejectedError, match=r"decompression_bomb: 200 x 200 pixels, the limit is 20000"):
        transform.load(tmp_path / "big.png", max_pixels=20_000)
    # a JPEG counts at the reduced scale draft mode decodes it at (1/4 here)
    assert transform.load(tmp_path / "big.jpg", max_pixels=20_000).size == (48, 48)
    with pytest.raises(RejectedError, match="decompression_bomb"):
        transform.load(tmp_path / "big.jpg", draft=False, max_pixels=20_000)
