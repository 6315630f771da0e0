"""predict_similarity.py end to end on a tiny checkpoint: scores, modes, zero-shot, output and errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from _service import write_siglip_checkpoint
from PIL import Image, ImageDraw

import predict_similarity
from component.encoding import prompts
from component.model import BertCLIPModel
from component.processor import load_processor

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形", "一辆白色的汽车"]
LABELS = ["猫", "狗", "鸟"]
TEMPLATES = ["一张{}的照片。", "{}的照片。"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three drawn PNG images, one of them in a subdirectory."""
    directory = tmp_path_factory.mktemp("images")
    (directory / "more").mkdir()
    shapes = [("a.png", "red", (40, 30)), ("b.png", "teal", (30, 56)), ("more/c.png", "navy", (60, 60))]
    for name, color, size in shapes:
        image = Image.new("RGB", size, color)
        ImageDraw.Draw(image).rectangle((3, 3, size[0] // 2, size[1] // 3), fill="yellow")
        image.save(directory / name)
    return directory


@pytest.fixture(scope="module")
def images(image_dir) -> list[str]:
    return [str(image_dir / name) for name in ("a.png", "b.png", "more/c.png")]


@pytest.fixture(scope="module")
def chinese_clip_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model saved as a transformers ChineseCLIPModel, with a ChineseCLIPProcessor."""
    from transformers import ChineseCLIPImageProcessorPil, ChineseCLIPProcessor

    directory = tmp_path_factory.mktemp("chinese_clip")
    BertCLIPModel.from_pretrained(tiny_checkpoint).to_chinese_clip().save_pretrained(directory)
    image_processor = ChineseCLIPImageProcessorPil(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, do_center_crop=True
    )
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def run_json(capsys, *argv) -> dict:
    predict_similarity.main([*map(str, argv), "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        predict_similarity.main([*map(str, argv), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


def model_logits_per_image(
    checkpoint, images: list[str], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own logits_per_image, and its exp(logit_scale), from the transformers processor."""
    model = BertCLIPModel.from_pretrained(checkpoint).eval()
    inputs = load_processor(checkpoint)(
        text=texts, images=[Image.open(path) for path in images], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        outputs = model(**inputs)
    return outputs.logits_per_image, model.logit_scale.exp().detach()


def test_image_text_cosine_is_the_model_own_similarity(capsys, tiny_checkpoint, images):
    document = run_json(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images", *images, "--texts", *TEXTS
    )
    logits_per_image, scale = model_logits_per_image(tiny_checkpoint, images, TEXTS)
    torch.testing.assert_close(
        torch.tensor(document["cosine"]), logits_per_image / scale, atol=TOLERANCE, rtol=0
    )


def test_image_text_probs_are_the_scaled_softmax(capsys, tiny_checkpoint, images):
    document = run_json(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images", *images, "--texts", *TEXTS
    )
    probs = torch.tensor(document["probs"])
    logits_per_image, scale = model_logits_per_image(tiny_checkpoint, images, TEXTS)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(images)))
    torch.testing.assert_close(probs, logits_per_image.softmax(dim=-1), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(probs, (torch.tensor(document["cosine"]) * scale).softmax(dim=-1))


@pytest.mark.parametrize("mode", ["text-text", "image-image"])
def test_same_modality_modes_exclude_the_self_match(capsys, tiny_checkpoint, images, mode):
    inputs = ["--texts", *TEXTS] if mode == "text-text" else ["--images", *images]
    document = run_json(capsys, "--model_name_or_path", tiny_checkpoint, *inputs, "--mode", mode)
    cosine, probs = torch.tensor(document["cosine"]), torch.tensor(document["probs"])
    count = len(document["queries"])
    assert document["candidates"] == document["queries"]
    assert torch.all(probs.diagonal() == 0)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(count))
    torch.testing.assert_close(cosine.diagonal(), torch.ones(count), atol=TOLERANCE, rtol=0)
    scale = BertCLIPModel.from_pretrained(tiny_checkpoint).logit_scale.exp().detach()
    others = ~torch.eye(count, dtype=torch.bool)
    expected = (cosine[others].view(count, count - 1) * scale).softmax(dim=-1)
    torch.testing.assert_close(probs[others].view(count, count - 1), expected)
    assert all(query not in top for query, top in enumerate(document["top_k"]))


def test_zero_shot_picks_the_label_with_the_closest_prompt_embedding(capsys, tiny_checkpoint, images):
    document = run_json(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images", *images, "--labels", *LABELS,
        "--templates", *TEMPLATES, "--top_k", 1,
    )  # fmt: skip
    model, processor = BertCLIPModel.from_pretrained(tiny_checkpoint).eval(), load_processor(tiny_checkpoint)
    with torch.no_grad():
        pixel_values = processor(images=[Image.open(path) for path in images], return_tensors="pt")[
            "pixel_values"
        ]
        image_embeds = F.normalize(model.get_image_features(pixel_values), dim=-1)
        class_embeds = []
        for label in LABELS:
            inputs = processor.tokenizer(prompts(label, TEMPLATES), padding=True, return_tensors="pt")
            class_embeds.append(F.normalize(model.get_text_features(**inputs), dim=-1).mean(dim=0))
        class_embeds = F.normalize(torch.stack(class_embeds), dim=-1)
    expected = image_embeds @ class_embeds.T
    assert document["candidates"] == LABELS
    assert document["templates"] == TEMPLATES
    assert document["top_k"] == expected.argmax(dim=-1, keepdim=True).tolist()
    torch.testing.assert_close(torch.tensor(document["cosine"]), expected, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def siglip_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with a logit bias: a SigLIP model."""
    return write_siglip_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("siglip"), 2.3, -4.0)


@pytest.mark.parametrize("mode", ["image-text", "text-text"])
def test_a_siglip_model_reports_sigmoid_match_probabilities(capsys, siglip_checkpoint, images, mode):
    inputs = ["--images", *images, "--texts", *TEXTS] if mode == "image-text" else ["--texts", *TEXTS]
    document = run_json(capsys, "--model_name_or_path", siglip_checkpoint, *inputs)
    assert (document["mode"], document["probability"]) == (mode, "sigmoid")
    cosine, probs = torch.tensor(document["cosine"]), torch.tensor(document["probs"])
    expected = torch.sigmoid(cosine * torch.tensor(2.3).exp() - 4.0)  # each pair on its own
    if mode == "text-text":
        expected.fill_diagonal_(0.0)  # the self-match
    torch.testing.assert_close(probs, expected, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(probs.sum(dim=-1), torch.ones(len(probs)))  # not a softmax


def test_json_document_schema(capsys, tiny_checkpoint, images):
    document = run_json(
        capsys,
        "--model_name_or_path",
        tiny_checkpoint,
        "--images",
        *images[:2],
        "--texts",
        *TEXTS,
        "--top_k",
        3,
    )
    assert set(document) == {"mode", "probability", "queries", "candidates", "cosine", "probs", "top_k"}
    assert (document["mode"], document["probability"]) == ("image-text", "softmax")
    assert document["queries"] == images[:2] and document["candidates"] == TEXTS
    for matrix in ("cosine", "probs"):
        assert len(document[matrix]) == 2
        assert all(
            len(row) == len(TEXTS) and all(isinstance(value, float) for value in row)
            for row in document[matrix]
        )
    assert [len(row) for row in document["top_k"]] == [3, 3]


def test_default_output_ranks_top_k_candidates_per_query(capsys, tiny_checkpoint, images):
    predict_similarity.main(
        ["--model_name_or_path", str(tiny_checkpoint), "--images", *images, "--texts", *TEXTS, "--top_k", "2"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(images) * 3
    assert lines[0] == images[0]
    ranked = lines[1:3]
    assert [line.split()[0] for line in ranked] == ["1.", "2."]
    assert all("prob" in line and "cosine" in line and line.split()[-1] in TEXTS for line in ranked)
    probs = [float(line.split()[2]) for line in ranked]
    assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize(
    ("inputs", "mode"),
    [
        (["--images", "IMAGE", "--texts", "猫", "狗"], "image-text"),
        (["--images", "IMAGE", "--labels", "猫", "狗"], "image-text"),
        (["--texts", "猫", "狗"], "text-text"),
        (["--images", "IMAGE", "IMAGE"], "image-image"),
    ],
)
def test_mode_follows_from_the_inputs(capsys, tiny_checkpoint, images, inputs, mode):
    inputs = [images[0] if value == "IMAGE" else value for value in inputs]
    assert run_json(capsys, "--model_name_or_path", tiny_checkpoint, *inputs)["mode"] == mode


def test_texts_file_and_images_dir_are_read_in_batches(capsys, tiny_checkpoint, image_dir, images, tmp_path):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n", encoding="utf-8")
    document = run_json(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images_dir", image_dir,
        "--texts_file", texts_file, "--batch_size", 2,
    )  # fmt: skip
    reference = run_json(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images", *images, "--texts", *TEXTS
    )
    assert document["queries"] == images and document["candidates"] == TEXTS
    torch.testing.assert_close(torch.tensor(document["cosine"]), torch.tensor(reference["cosine"]))


def test_chinese_clip_checkpoint_gives_the_same_scores(
    capsys, tiny_checkpoint, chinese_clip_checkpoint, images
):
    arguments = ["--images", *images, "--texts", *TEXTS]
    document = run_json(capsys, "--model_name_or_path", chinese_clip_checkpoint, *arguments)
    reference = run_json(capsys, "--model_name_or_path", tiny_checkpoint, *arguments)
    torch.testing.assert_close(torch.tensor(document["cosine"]), torch.tensor(reference["cosine"]))
    torch.testing.assert_close(torch.tensor(document["probs"]), torch.tensor(reference["probs"]))


def test_missing_image_is_named(capsys, tiny_checkpoint, tmp_path):
    missing = tmp_path / "missing.jpg"
    error = run_error(capsys, "--model_name_or_path", tiny_checkpoint, "--images", missing, "--texts", "猫")
    assert error.startswith("error: ") and str(missing) in error


def test_unreadable_image_is_named(capsys, tiny_checkpoint, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    error = run_error(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images", images[0], broken, "--texts", "猫"
    )
    assert error.startswith("error: ") and str(broken) in error


def test_empty_inputs_are_refused(capsys, tiny_checkpoint, tmp_path):
    empty_file, empty_dir = tmp_path / "empty.txt", tmp_path / "no_images"
    empty_file.write_text("\n  \n", encoding="utf-8")
    empty_dir.mkdir()
    assert str(empty_file) in run_error(
        capsys, "--model_name_or_path", tiny_checkpoint, "--texts_file", empty_file
    )
    assert str(empty_dir) in run_error(
        capsys, "--model_name_or_path", tiny_checkpoint, "--images_dir", empty_dir
    )
    assert "nothing to score" in run_error(capsys, "--model_name_or_path", tiny_checkpoint)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["--mode", "text-text", "--texts", "猫"], "at least 2 texts"),
        (["--mode", "image-image", "--texts", "猫", "狗"], "at least 2 images"),
        (["--mode", "image-text", "--texts", "猫", "狗"], "needs images"),
        (["--mode", "text-text", "--labels", "猫", "狗"], "image-text mode"),
        (["--labels", "猫", "--texts", "狗"], "not both"),
    ],
)
def test_mode_without_the_inputs_it_needs_is_refused(capsys, tiny_checkpoint, inputs, message):
    assert message in run_error(capsys, "--model_name_or_path", tiny_checkpoint, *inputs)


def test_missing_checkpoint_is_an_error_not_a_traceback(capsys, tmp_path):
    error = run_error(capsys, "--model_name_or_path", tmp_path, "--texts", "猫", "狗")
    assert error.startswith("error: ") and str(tmp_path) in error
