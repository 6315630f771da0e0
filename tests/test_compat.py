"""Compatibility with real clients: legacy checkpoints, transformers' pipeline and Auto classes, the
ChineseCLIP export, damaged weights, prompt templates and a closed stdout."""

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    PreTrainedTokenizerBase,
    pipeline,
)

import predict_similarity
from component.cli import SIGPIPE_EXIT_STATUS
from component.encoding import class_embeddings, encode_images, prompts, similarity_scores
from component.interop import CheckpointError
from component.model import BertCLIPModel
from component.processor import build_processor, load_processor
from component.training.run import build_model_and_processor

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形"]
TOLERANCE = 1e-5
SAVED_JSONS = ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


def noise_image(path: Path, size=(53, 41), seed=0) -> Path:
    """A PNG of random pixels, odd-sized so that resize and crop both matter."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """predict_similarity.main on the CPU; (exit status, stdout, stderr)."""
    try:
        predict_similarity.main([*map(str, argv), "--device", "cpu"])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_legacy_checkpoint(checkpoint: Path, directory: Path, image_processor_type: str, with_both=True):
    """`checkpoint` as transformers 4.46-4.53 saved the original CLIP-Chinese processor: a
    CLIPProcessor of a `*FeatureExtractor` and a BERT tokenizer, no processor_config.json."""
    directory.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(checkpoint / name, directory / name)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config.pop("backend")  # transformers 4 wrote none
    tokenizer_config["processor_class"] = "CLIPProcessor"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    settings = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    settings |= {"image_processor_type": image_processor_type, "processor_class": "CLIPProcessor"}
    if with_both:
        settings["feature_extractor_type"] = image_processor_type
    (directory / "preprocessor_config.json").write_text(json.dumps(settings))
    return directory


@pytest.fixture(scope="module")
def legacy_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_legacy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("legacy") / "ckpt",
                                   "CLIPFeatureExtractor")  # fmt: skip


# 1. Checkpoints with a removed *FeatureExtractor image processor type


@pytest.mark.parametrize(
    ("type_name", "with_both", "processor_class"),
    [
        ("CLIPFeatureExtractor", True, "VisionTextDualEncoderProcessor"),
        ("CLIPFeatureExtractor", False, "VisionTextDualEncoderProcessor"),
        ("ChineseCLIPFeatureExtractor", True, "ChineseCLIPProcessor"),
    ],
)
def test_feature_extractor_checkpoint_loads_the_same_processor(
    tiny_checkpoint, tmp_path, type_name, with_both, processor_class
):
    legacy = write_legacy_checkpoint(tiny_checkpoint, tmp_path / "legacy", type_name, with_both)
    before = file_bytes(legacy)
    processor, reference = load_processor(legacy), load_processor(tiny_checkpoint)
    assert type(processor).__name__ == processor_class
    image = Image.open(noise_image(tmp_path / "noise.png"))
    torch.testing.assert_close(
        processor(images=[image], return_tensors="pt")["pixel_values"],
        reference(images=[image], return_tensors="pt")["pixel_values"],
    )
    assert processor.tokenizer(TEXTS)["input_ids"] == reference.tokenizer(TEXTS)["input_ids"]
    assert file_bytes(legacy) == before  # the user's checkpoint is never rewritten


def test_predict_similarity_scores_a_feature_extractor_checkpoint(
    capsys, tiny_checkpoint, legacy_checkpoint, tmp_path
):
    image = noise_image(tmp_path / "noise.png")
    arguments = ["--images", image, "--texts", *TEXTS, "--json"]
    status, out, err = run_main(capsys, "--model_name_or_path", legacy_checkpoint, *arguments)
    assert status == 0, err
    _, reference, _ = run_main(capsys, "--model_name_or_path", tiny_checkpoint, *arguments)
    assert json.loads(out)["cosine"] == json.loads(reference)["cosine"]


def test_training_continues_from_a_feature_extractor_checkpoint(legacy_checkpoint):
    model, processor = build_model_and_processor(SimpleNamespace(model_name_or_path=str(legacy_checkpoint)))
    assert isinstance(model, BertCLIPModel)
    assert dict(processor.image_processor.size) == {"shortest_edge": 30}


def test_save_vision_tower_from_a_feature_extractor_checkpoint(legacy_checkpoint, tmp_path):
    BertCLIPModel.from_pretrained(legacy_checkpoint).save_vision_tower(tmp_path / "vision")
    saved = json.loads((tmp_path / "vision" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor"


def test_broken_image_processor_is_named_and_nothing_is_written(capsys, tiny_checkpoint, tmp_path):
    broken = write_legacy_checkpoint(tiny_checkpoint, tmp_path / "broken", "NoSuchFeatureExtractor")
    with pytest.raises(CheckpointError, match="NoSuchImageProcessor"):
        BertCLIPModel.from_pretrained(broken).save_vision_tower(tmp_path / "vision")
    assert not (tmp_path / "vision").exists()  # all or nothing
    status, _, err = run_main(capsys, "--model_name_or_path", broken, "--texts", "猫", "狗")
    assert status == 2 and "Traceback" not in err
    assert "image processor" in err and "no tokenizer" not in err  # it was saved, it is broken


# 3. transformers' zero-shot image classification pipeline


def test_zero_shot_pipeline_gives_our_scores(tiny_checkpoint, tmp_path):
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_checkpoint), device="cpu")
    image_path, labels, template = noise_image(tmp_path / "noise.png"), ["猫", "狗", "鸟"], "一张{}的照片。"
    results = classifier(str(image_path), candidate_labels=labels, hypothesis_template=template)
    model, processor = BertCLIPModel.from_pretrained(tiny_checkpoint).eval(), load_processor(tiny_checkpoint)
    image_embeds = encode_images(model, processor, [image_path])
    label_embeds = class_embeddings(model, processor, labels, [template])
    _, expected = similarity_scores(image_embeds, label_embeds, model.logit_scale.detach())
    scores = torch.tensor([{r["label"]: r["score"] for r in results}[label] for label in labels])
    torch.testing.assert_close(scores, expected[0], atol=TOLERANCE, rtol=0)


# 4. Saved configs hold what transformers itself writes


def test_text_tower_directory_is_a_plain_tokenizer_for_auto_processor(tiny_model, tiny_checkpoint, tmp_path):
    tiny_model.save_text_tower(tmp_path, tokenizer=load_processor(tiny_checkpoint).tokenizer)
    assert "processor_class" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), PreTrainedTokenizerBase)


@pytest.mark.parametrize("stray_backend", [False, True])
def test_reloaded_processor_saves_what_transformers_writes(
    tiny_towers, tiny_checkpoint, tmp_path, stray_backend
):
    reference = tmp_path / "reference"
    build_processor(tiny_towers["clip"], tiny_towers["bert"]).save_pretrained(reference)
    source = tiny_checkpoint
    if stray_backend:  # a checkpoint saved by the old loader, which wrote "backend": "pil"
        source = shutil.copytree(tiny_checkpoint, tmp_path / "old")
        config = json.loads((source / "tokenizer_config.json").read_text()) | {"backend": "pil"}
        (source / "tokenizer_config.json").write_text(json.dumps(config))
    load_processor(source).save_pretrained(tmp_path / "saved")
    for name in SAVED_JSONS:
        if (reference / name).exists() or (tmp_path / "saved" / name).exists():
            saved = json.loads((tmp_path / "saved" / name).read_text())
            assert saved == json.loads((reference / name).read_text()), name
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["backend"] == "tokenizers"


# 16. Damaged weights


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_one_line_naming_the_file(capsys, tiny_checkpoint, tmp_path, damage):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "damaged")
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not weights" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the weights"):
        BertCLIPModel.from_pretrained(checkpoint)
    status, _, err = run_main(capsys, "--model_name_or_path", checkpoint, "--texts", "猫", "狗")
    assert status == 2 and err.strip().splitlines() == [err.strip()] and str(weights) in err


# 17. Prompt templates


def test_braces_other_than_the_placeholder_are_literal_text(capsys, tiny_checkpoint, tmp_path):
    templates = ['{"label": "{}"}', "{label}: 一张{}的照片。"]
    assert prompts("猫", templates) == ['{"label": "猫"}', "{label}: 一张猫的照片。"]
    image = noise_image(tmp_path / "noise.png")
    status, out, err = run_main(capsys, "--model_name_or_path", tiny_checkpoint, "--images", image,
                                "--labels", "猫", "狗", "--templates", *templates, "--json")  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["templates"] == templates


def test_template_without_a_placeholder_is_refused_in_one_line(capsys, tiny_checkpoint, tmp_path):
    image = noise_image(tmp_path / "noise.png")
    status, _, err = run_main(capsys, "--model_name_or_path", tiny_checkpoint, "--images", image,
                              "--labels", "猫", "--templates", "{label}的照片")  # fmt: skip
    assert (
        status == 2 and err.strip() == "error: prompt template '{label}的照片' has no '{}' for the class name"
    )


# 18. A reader that closes the pipe early


def test_closed_stdout_ends_quietly_with_sigpipe_status(capsys, tiny_checkpoint, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has read all it wants before the first line
    with os.fdopen(write_end, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        with pytest.raises(SystemExit) as exit_info:
            predict_similarity.main(["--model_name_or_path", str(tiny_checkpoint), "--texts", *TEXTS])
        monkeypatch.undo()
        assert exit_info.value.code == SIGPIPE_EXIT_STATUS == 141
        assert os.path.samestat(os.fstat(stdout.fileno()), os.stat(os.devnull))  # the flush at exit is safe
    assert "Traceback" not in capsys.readouterr().err


# 20. The ChineseCLIP export


@pytest.fixture(scope="module")
def chinese_clip_export(tiny_checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export") / "chinese_clip"
    BertCLIPModel.from_pretrained(tiny_checkpoint).save_chinese_clip(directory)
    return directory


def test_chinese_clip_export_loads_with_transformers_alone(
    tiny_model, tiny_checkpoint, chinese_clip_export, tmp_path
):
    images = [Image.open(noise_image(tmp_path / f"{seed}.png", size, seed))
              for seed, size in enumerate([(53, 41), (30, 77)])]  # fmt: skip
    processor = ChineseCLIPProcessor.from_pretrained(chinese_clip_export)
    model = ChineseCLIPModel.from_pretrained(chinese_clip_export).eval()
    ours = load_processor(tiny_checkpoint)
    with torch.no_grad():
        logits = model(
            **processor(text=TEXTS, images=images, return_tensors="pt", padding=True)
        ).logits_per_image
        expected = tiny_model(
            **ours(text=TEXTS, images=images, return_tensors="pt", padding=True)
        ).logits_per_image
    torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0)


def test_predict_similarity_scores_the_chinese_clip_export(
    capsys, tiny_checkpoint, chinese_clip_export, tmp_path
):
    arguments = ["--images", noise_image(tmp_path / "noise.png"), "--texts", *TEXTS, "--json"]
    status, out, err = run_main(capsys, "--model_name_or_path", chinese_clip_export, *arguments)
    assert status == 0, err
    _, reference, _ = run_main(capsys, "--model_name_or_path", tiny_checkpoint, *arguments)
    torch.testing.assert_close(
        torch.tensor(json.loads(out)["probs"]), torch.tensor(json.loads(reference)["probs"])
    )


def test_chinese_clip_export_without_a_processor_writes_nothing(tiny_model, tmp_path):
    tiny_model.name_or_path = str(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="pass processor="):
        tiny_model.save_chinese_clip(tmp_path / "export")
    assert not (tmp_path / "export").exists()
