"""The shared encoding helpers against the model's own features and hand-computed scores."""

import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from component.encoding import (
    InputError,
    class_embeddings,
    encode_images,
    encode_texts,
    load_model_and_processor,
    match_probabilities,
    probability_kind,
    prompts,
    similarity_scores,
    top_candidates,
)
from component.interop import CheckpointError
from component.processor import load_processor

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形", "猫", "一辆停在路边的白色汽车"]
TOLERANCE = 1e-5


def drawn_image(color: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse((4, 4, size[0] // 2, size[1] // 2), fill="white")
    return image


@pytest.fixture
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)


@pytest.fixture
def image_files(tmp_path) -> list:
    paths = []
    for index, (color, size) in enumerate([("red", (40, 30)), ("teal", (30, 55)), ("navy", (60, 60))]):
        paths.append(tmp_path / f"image{index}.png")
        drawn_image(color, size).save(paths[-1])
    return paths


def test_encode_texts_equals_normalised_model_features(tiny_model, processor):
    inputs = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(tiny_model.get_text_features(**inputs), dim=-1)
    embeds = encode_texts(tiny_model, processor, TEXTS, batch_size=2)
    assert embeds.dtype == torch.float32 and embeds.device.type == "cpu"
    torch.testing.assert_close(embeds, expected, atol=TOLERANCE, rtol=0)


def test_encode_images_equals_features_of_the_transformers_processor(tiny_model, processor, image_files):
    pixel_values = processor(images=[Image.open(path) for path in image_files], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        expected = F.normalize(tiny_model.get_image_features(pixel_values), dim=-1)
    from_files = encode_images(tiny_model, processor, image_files, batch_size=2)
    from_pil = encode_images(tiny_model, processor, [Image.open(path) for path in image_files])
    torch.testing.assert_close(from_files, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(from_pil, expected, atol=TOLERANCE, rtol=0)


def test_encoding_restores_training_mode_and_returns_ordinary_tensors(tiny_model, processor):
    tiny_model.train()
    embeds = encode_texts(tiny_model, processor, TEXTS[:2])
    assert tiny_model.training
    assert not embeds.is_inference()
    embeds[0, 0] = 0.0  # callers may modify the result in place


def test_encode_images_names_a_missing_or_unreadable_file(tiny_model, processor, image_files, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        encode_images(tiny_model, processor, [image_files[0], missing])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=re.escape(str(broken))):
        encode_images(tiny_model, processor, [broken])


def test_empty_inputs_are_refused(tiny_model, processor):
    with pytest.raises(InputError, match="no texts"):
        encode_texts(tiny_model, processor, [])
    with pytest.raises(InputError, match="no images"):
        encode_images(tiny_model, processor, [])
    with pytest.raises(InputError, match="no labels"):
        class_embeddings(tiny_model, processor, [])


def test_class_embeddings_average_normalised_prompt_embeddings(tiny_model, processor):
    templates = ["一张{}的照片。", "{}的素描。", "一幅{}的画。"]
    weights = class_embeddings(tiny_model, processor, ["猫", "狗"], templates)
    for label, row in zip(["猫", "狗"], weights, strict=True):
        inputs = processor.tokenizer(prompts(label, templates), padding=True, return_tensors="pt")
        with torch.no_grad():
            prompt_embeds = F.normalize(tiny_model.get_text_features(**inputs), dim=-1)
        torch.testing.assert_close(row, F.normalize(prompt_embeds.mean(dim=0), dim=0), atol=TOLERANCE, rtol=0)


def test_class_embeddings_refuse_a_template_without_a_placeholder(tiny_model, processor):
    with pytest.raises(InputError, match="照片"):
        class_embeddings(tiny_model, processor, ["猫"], ["一张照片。"])


def test_similarity_scores_are_the_scaled_softmax_of_cosines():
    torch.manual_seed(0)
    queries, candidates = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    logit_scale = torch.tensor(2.0)
    cosine, probs = similarity_scores(queries, candidates, logit_scale)
    torch.testing.assert_close(cosine, queries @ candidates.T)
    torch.testing.assert_close(probs, (queries @ candidates.T * logit_scale.exp()).softmax(dim=-1))


def test_similarity_scores_exclude_the_self_match():
    torch.manual_seed(0)
    embeds = F.normalize(torch.randn(4, 8), dim=-1)
    cosine, probs = similarity_scores(embeds, embeds, 3.0, exclude_self=True)
    assert torch.all(probs.diagonal() == 0)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(4))
    torch.testing.assert_close(cosine.diagonal(), torch.ones(4))
    others = ~torch.eye(4, dtype=torch.bool)
    expected = (cosine[others].view(4, 3) * torch.tensor(3.0).exp()).softmax(dim=-1)
    torch.testing.assert_close(probs[others].view(4, 3), expected)


def test_match_probabilities_follow_the_loss_softmax_without_a_bias_sigmoid_with_one():
    torch.manual_seed(0)
    cosine = torch.rand(3, 4) * 2 - 1
    softmax = match_probabilities(cosine, 2.0)
    torch.testing.assert_close(softmax, (cosine * math.exp(2.0)).softmax(dim=-1))
    sigmoid = match_probabilities(cosine, 2.0, logit_bias=-3.0)
    by_hand = [
        [1 / (1 + math.exp(-(math.exp(2.0) * value - 3.0))) for value in row] for row in cosine.tolist()
    ]
    torch.testing.assert_close(sigmoid, torch.tensor(by_hand))
    assert probability_kind(None) == "softmax" and probability_kind(-3.0) == "sigmoid"


def test_sigmoid_probabilities_exclude_the_self_match_and_leave_the_others_alone():
    cosine = torch.tensor([[1.0, 0.2, -0.5], [0.2, 1.0, 0.1], [-0.5, 0.1, 1.0]])
    probs = match_probabilities(cosine, 1.0, -1.0, exclude_self=True)
    expected = torch.sigmoid(cosine * math.e - 1.0).fill_diagonal_(0.0)
    torch.testing.assert_close(probs, expected)


def test_top_candidates_skip_the_self_match_and_cap_k():
    cosine = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.1], [0.5, 0.1, 1.0]])
    assert top_candidates(cosine, 10, exclude_self=True).tolist() == [[2, 1], [0, 2], [0, 1]]
    assert top_candidates(cosine, 1).tolist() == [[0], [1], [2]]


def test_load_model_and_processor_gives_an_eval_model_on_the_device(tiny_checkpoint):
    model, processor = load_model_and_processor(tiny_checkpoint, device="cpu")
    assert not model.training
    assert model.device.type == "cpu"
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size


def test_load_model_and_processor_names_a_checkpoint_without_processor(tiny_checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="no tokenizer or image processor saved"):
        load_model_and_processor(tmp_path, device="cpu")
