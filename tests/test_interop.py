"""Checkpoint interop with transformers' ChineseCLIPModel and the original CLIP-Chinese layout."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BertModel,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    CLIPVisionModelWithProjection,
)

from component.interop import CheckpointError
from component.model import BertCLIPModel
from component.processor import check_tokenizer_fits, load_processor
from component.testing.tiny import tiny_bert_config

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形"]
TOLERANCE = 1e-5


def make_inputs(checkpoint):
    processor = load_processor(checkpoint)
    images = [Image.new("RGB", (45, 31), color) for color in ("red", "teal", "navy")]
    return dict(processor(text=TEXTS, images=images, return_tensors="pt", padding=True))


def max_logit_difference(first, second, inputs) -> float:
    with torch.no_grad():
        return (first(**inputs).logits_per_image - second(**inputs).logits_per_image).abs().max().item()


def tiny_chinese_clip(vocab_size: int) -> ChineseCLIPModel:
    torch.manual_seed(1)
    text = tiny_bert_config(vocab_size).to_dict()
    vision = {"image_size": 30, "patch_size": 6, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 64}  # fmt: skip
    config = ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return ChineseCLIPModel(config).eval()


def test_loads_chinese_clip_checkpoint_exactly(tiny_checkpoint, tmp_path):
    processor = load_processor(tiny_checkpoint)
    reference = tiny_chinese_clip(len(processor.tokenizer))
    reference.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "chinese_clip"
    model, info = BertCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_pooling == "cls"
    assert max_logit_difference(model.eval(), reference, make_inputs(tmp_path)) <= TOLERANCE


def test_to_chinese_clip_gives_the_same_outputs(tiny_model, tiny_checkpoint, tmp_path):
    chinese = tiny_model.to_chinese_clip()
    assert isinstance(chinese, ChineseCLIPModel)
    inputs = make_inputs(tiny_checkpoint)
    assert max_logit_difference(tiny_model, chinese, inputs) <= TOLERANCE
    chinese.save_pretrained(tmp_path)  # and it round-trips through transformers alone
    assert max_logit_difference(ChineseCLIPModel.from_pretrained(tmp_path).eval(), chinese, inputs) == 0.0


def test_to_chinese_clip_refuses_pooler_pooling(tiny_towers):
    model = BertCLIPModel.from_vision_text_pretrained(
        str(tiny_towers["clip"]), str(tiny_towers["bert"]), text_pooling="pooler"
    )
    with pytest.raises(ValueError, match="text_pooling='cls'"):
        model.to_chinese_clip()


def write_original_layout(model: BertCLIPModel, directory, weights: str) -> None:
    """Save `model` as the 2022 CLIP-Chinese release did: model_type "clip", BertCLIPModel."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "clip",
        "architectures": ["BertCLIPModel"],
        "text_config": {**model.config.text_config.to_dict(), "model_type": "bert"},
        "vision_config": {**model.config.vision_config.to_dict(), "model_type": "clip_vision_model"},
        "projection_dim": model.config.projection_dim,
        "logit_scale_init_value": 2.6592,
    }
    (directory / "config.json").write_text(json.dumps(config, default=str))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")


def reference_logits(model: BertCLIPModel, inputs) -> torch.Tensor:
    """Logits computed with transformers' own BertModel and CLIPVisionModelWithProjection."""
    bert = BertModel(model.config.text_config)
    bert.load_state_dict(model.text_model.state_dict())
    vision_config = model.config.vision_config.to_dict() | {"projection_dim": model.config.projection_dim}
    vision = CLIPVisionModelWithProjection(model.config.vision_config.__class__(**vision_config))
    vision.load_state_dict(
        {
            **{f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()},
            "visual_projection.weight": model.visual_projection.weight,
        }
    )
    with torch.no_grad():
        pooled = bert.eval()(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        text = F.normalize(model.text_projection(pooled), dim=-1)
        image = F.normalize(vision.eval()(pixel_values=inputs["pixel_values"]).image_embeds, dim=-1)
        return image @ text.T * model.logit_scale.exp()


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_loads_original_clip_chinese_layout(tiny_towers, tiny_checkpoint, tmp_path, weights):
    torch.manual_seed(2)
    source = BertCLIPModel.from_vision_text_pretrained(
        str(tiny_towers["clip"]), str(tiny_towers["bert"]), text_pooling="pooler"
    )
    write_original_layout(source, tmp_path / "original", weights)
    model, info = BertCLIPModel.from_pretrained(tmp_path / "original", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_pooling == "pooler"
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits_per_image
    assert (logits - reference_logits(source.eval(), inputs)).abs().max().item() <= TOLERANCE


def test_save_text_tower_is_a_plain_bert(tiny_model, tiny_checkpoint, tmp_path):
    tiny_model.save_text_tower(tmp_path, tokenizer=load_processor(tiny_checkpoint).tokenizer)
    bert = BertModel.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls_state = bert(**inputs).last_hidden_state[:, 0]
        expected = tiny_model.get_text_features(**inputs)
    torch.testing.assert_close(tiny_model.text_projection(cls_state), expected)


def test_save_vision_tower_is_a_clip_vision_model(tiny_model, tiny_checkpoint, tmp_path):
    tiny_model.name_or_path = str(tiny_checkpoint)
    tiny_model.save_vision_tower(tmp_path)
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    image_processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    pixel_values = image_processor(images=[Image.new("RGB", (50, 40), "orange")], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        torch.testing.assert_close(vision(pixel_values=pixel_values).image_embeds,
                                   tiny_model.get_image_features(pixel_values))  # fmt: skip


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        BertCLIPModel.from_pretrained(tmp_path)


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        BertCLIPModel.from_pretrained(tmp_path)


def test_wrong_shape_weights_are_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["projection_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shape.*text_projection"):
        BertCLIPModel.from_pretrained(tmp_path)


def test_tokenizer_larger_than_text_tower_is_refused(tiny_model, tiny_checkpoint):
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    check_tokenizer_fits(tokenizer, tiny_model, tiny_checkpoint)
    tiny_model.config.text_config.vocab_size = len(tokenizer) - 10
    with pytest.raises(ValueError, match=r"vocab_size"):
        check_tokenizer_fits(tokenizer, tiny_model, tiny_checkpoint)


def test_missing_tower_directory_is_named(tiny_towers, tmp_path):
    with pytest.raises(CheckpointError, match=r"clipx: no such directory"):
        BertCLIPModel.from_vision_text_pretrained(str(tmp_path / "clipx"), str(tiny_towers["bert"]))
