"""BertCLIPModel: config, forward, features, save/load and the Auto classes."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, BertTokenizerFast

from component.configuration import BertCLIPConfig
from component.interop import CheckpointError
from component.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, contrastive_loss, siglip_loss
from component.model import BertCLIPModel, BertCLIPTextModel
from component.processor import load_processor

TEXTS = ["左上角有一个红色的圆形", "一只小狗在摇尾巴", "一只小猪在吃饭"]


def make_inputs(checkpoint, texts=TEXTS):
    processor = load_processor(checkpoint)
    colors = ["red", "green", "blue", "yellow"]
    images = [Image.new("RGB", (40 + 3 * i, 33), colors[i]) for i in range(len(texts))]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def test_config_round_trip_and_validation(tmp_path):
    config = BertCLIPConfig(
        text_config={"hidden_size": 32}, vision_config={"image_size": 30}, text_pooling="pooler"
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BertCLIPConfig)
    assert loaded.text_pooling == "pooler" and loaded.text_config.hidden_size == 32
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert_clip"
    assert loaded.logit_bias_init_value is None
    with pytest.raises(ValueError, match="text_pooling"):
        BertCLIPConfig(text_pooling="max")


def test_chinese_text_does_not_tokenize_to_unk(tiny_towers):
    tokenizer = BertTokenizerFast.from_pretrained(tiny_towers["bert"])
    tokens = tokenizer.tokenize("".join(TEXTS) + "，。Hello 2024")
    assert tokenizer.unk_token not in tokens
    assert "圆" in tokens


def test_forward_outputs_are_consistent(tiny_model, tiny_checkpoint):
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        out = tiny_model(**inputs, return_loss=True)
        text_features = tiny_model.get_text_features(
            inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        )
        image_features = tiny_model.get_image_features(inputs["pixel_values"])
    n = len(TEXTS)
    assert out.logits_per_image.shape == (n, n) and out.text_embeds.shape == (n, 16)
    torch.testing.assert_close(out.text_embeds, F.normalize(text_features, dim=-1))
    torch.testing.assert_close(out.image_embeds, F.normalize(image_features, dim=-1))
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(n))
    expected = out.image_embeds @ out.text_embeds.T * tiny_model.logit_scale.exp()
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.T)
    torch.testing.assert_close(
        out.loss, contrastive_loss(out.image_embeds, out.text_embeds, tiny_model.logit_scale)
    )


def test_features_are_plain_tensors(tiny_model, tiny_checkpoint):
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        features = tiny_model.get_image_features(inputs["pixel_values"])
    assert type(features) is torch.Tensor
    assert not torch.allclose(features.norm(dim=-1), torch.ones(len(TEXTS)))  # not normalised


def test_loss_only_when_asked(tiny_model, tiny_checkpoint):
    with torch.no_grad():
        assert tiny_model(**make_inputs(tiny_checkpoint)).loss is None


def test_save_load_round_trip_is_exact(tiny_model, tiny_checkpoint, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = BertCLIPModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        assert torch.equal(tiny_model(**inputs).logits_per_image, reloaded(**inputs).logits_per_image)


def test_auto_classes_load_model_and_processor(tiny_checkpoint):
    model = AutoModel.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert isinstance(model, BertCLIPModel)
    assert processor.tokenizer.tokenize("红色")[0] == "红"
    assert processor(images=Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape[-1] == 30


def test_text_model_loads_from_full_checkpoint(tiny_model, tiny_checkpoint):
    text_model, info = BertCLIPTextModel.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        expected = tiny_model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        got = text_model.eval()(inputs["input_ids"], inputs["attention_mask"]).text_embeds
    torch.testing.assert_close(got, expected)


def test_from_vision_text_pretrained_copies_towers(tiny_towers):
    from transformers import BertModel, CLIPModel

    model = BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(tiny_towers["bert"]))
    clip = CLIPModel.from_pretrained(tiny_towers["clip"])
    bert = BertModel.from_pretrained(tiny_towers["bert"])
    assert torch.equal(model.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(model.logit_scale, clip.logit_scale)
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, clip.vision_model.state_dict()[name]), name
    for name, tensor in model.text_model.state_dict().items():
        assert torch.equal(tensor, bert.state_dict()[name]), name
    assert model.text_model.pooler is None  # text_pooling "cls" keeps no unused pooler


def test_from_vision_text_pretrained_reports_unused_weights(tiny_towers, caplog):
    with caplog.at_level("WARNING"):
        BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(tiny_towers["bert"]))
    assert "pooler.dense.weight" in caplog.text


def test_pooler_pooling_uses_bert_pooler(tiny_towers):
    model = BertCLIPModel.from_vision_text_pretrained(
        str(tiny_towers["clip"]), str(tiny_towers["bert"]), text_pooling="pooler"
    ).eval()
    ids = torch.tensor([[2, 100, 200, 3]])
    with torch.no_grad():
        bert_out = model.text_model(input_ids=ids)
        assert torch.equal(model.get_text_features(ids), model.text_projection(bert_out.pooler_output))


def test_gradient_checkpointing_covers_both_towers(tiny_model):
    tiny_model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in tiny_model.text_model.encoder.layer)
    assert all(layer.gradient_checkpointing for layer in tiny_model.vision_model.encoder.layers)


def test_both_towers_use_sdpa_attention(tiny_model):
    assert tiny_model.text_model.config._attn_implementation == "sdpa"
    assert tiny_model.vision_model.config._attn_implementation == "sdpa"


def siglip_model(tiny_model) -> BertCLIPModel:
    tiny_model.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    return tiny_model


def test_old_checkpoint_has_no_logit_bias(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["logit_bias_init_value"]  # written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = BertCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert model.config.logit_bias_init_value is None
    assert model.logit_bias is None and not model.uses_sigmoid
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_add_logit_bias_sets_scale_and_bias(tiny_model):
    model = siglip_model(tiny_model)
    assert model.uses_sigmoid
    assert model.logit_scale.item() == pytest.approx(SIGLIP_INIT_LOGIT_SCALE)
    assert model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS
    assert model.logit_bias.dtype == model.logit_scale.dtype and model.logit_bias.requires_grad
    assert model.config.logit_bias_init_value == SIGLIP_INIT_LOGIT_BIAS
    assert "logit_bias" in dict(model.named_parameters())


def test_siglip_save_load_keeps_the_bias(tiny_model, tiny_checkpoint, tmp_path):
    model = siglip_model(tiny_model)
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)  # trained away from its initial value
    model.save_pretrained(tmp_path)
    reloaded, info = BertCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.uses_sigmoid and reloaded.logit_bias.item() == -3.25
    assert AutoConfig.from_pretrained(tmp_path).logit_bias_init_value == SIGLIP_INIT_LOGIT_BIAS
    inputs = make_inputs(tiny_checkpoint)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, reloaded.eval()(**inputs).logits_per_image)


def test_siglip_logits_include_the_bias(tiny_model, tiny_checkpoint):
    model = siglip_model(tiny_model)
    with torch.no_grad():
        out = model(**make_inputs(tiny_checkpoint))
    expected = out.image_embeds @ out.text_embeds.T * model.logit_scale.exp() + model.logit_bias
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.T)
    assert out.logit_scale is model.logit_scale and out.logit_bias is model.logit_bias


def test_return_loss_is_siglip_for_a_biased_model(tiny_model, tiny_checkpoint):
    model = siglip_model(tiny_model)
    with torch.no_grad():
        out = model(**make_inputs(tiny_checkpoint), return_loss=True)
    expected = siglip_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale))


def test_unbiased_model_outputs_scale_and_no_bias(tiny_model, tiny_checkpoint):
    with torch.no_grad():
        out = tiny_model(**make_inputs(tiny_checkpoint))
    assert out.logit_scale is tiny_model.logit_scale and out.logit_bias is None


def test_to_chinese_clip_refuses_a_siglip_model(tiny_model, tmp_path):
    model = siglip_model(tiny_model)
    with pytest.raises(CheckpointError, match="ChineseCLIP has no logit bias"):
        model.to_chinese_clip()
    with pytest.raises(CheckpointError, match="ChineseCLIP has no logit bias"):
        model.save_chinese_clip(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_model_loads_from_a_siglip_checkpoint(tiny_model, tmp_path):
    siglip_model(tiny_model).save_pretrained(tmp_path)
    _, info = BertCLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
