"""Text towers besides BERT (tiny XLM-RoBERTa and ERNIE): build, pool, save, reload, train, predict, index."""

import json
from pathlib import Path

import pytest
import torch
from _runs import tiny_run_args, write_args, write_shapes
from PIL import Image
from transformers import AutoModel, AutoProcessor, DistilBertConfig, ErnieModel, XLMRobertaModel

import component  # noqa: F401  (registers the Auto classes)
import convert_checkpoint
import predict_similarity
import retrieval
import train_clip
from component.errors import CheckpointError
from component.model import BertCLIPModel, BertCLIPTextModel
from component.processor import load_processor, load_tokenizer
from component.testing.tiny import write_bert_clip, write_tiny_ernie, write_tiny_roberta
from component.text_tower import build_text_tower, max_text_length

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形"]
TOWERS = {"roberta": XLMRobertaModel, "ernie": ErnieModel}


@pytest.fixture(scope="module")
def text_towers(tmp_path_factory) -> dict[str, Path]:
    """A tiny XLM-RoBERTa ('roberta') and a tiny ERNIE ('ernie'), each with its tokenizer."""
    root = tmp_path_factory.mktemp("text_towers")
    torch.manual_seed(0)
    return {"roberta": write_tiny_roberta(root / "roberta"), "ernie": write_tiny_ernie(root / "ernie")}


@pytest.fixture(scope="module")
def checkpoints(tiny_towers, text_towers, tmp_path_factory) -> dict[str, Path]:
    """BertCLIP checkpoints with each tower (text_pooling 'mean'), saved with their processors."""
    root = tmp_path_factory.mktemp("tower_checkpoints")
    torch.manual_seed(0)
    return {
        name: write_bert_clip(root / name, tiny_towers["clip"], path, text_pooling="mean")
        for name, path in text_towers.items()
    }


def make_inputs(checkpoint: Path) -> dict:
    images = [Image.new("RGB", (45, 31), color) for color in ("red", "teal", "navy")]
    return dict(load_processor(checkpoint)(text=TEXTS, images=images, return_tensors="pt", padding=True))


@pytest.mark.parametrize("name", TOWERS)
def test_tower_is_built_through_auto_model(tiny_towers, text_towers, name):
    model = BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(text_towers[name]))
    assert type(model.text_model) is TOWERS[name]
    pretrained = AutoModel.from_pretrained(text_towers[name])
    for key, tensor in model.text_model.state_dict().items():
        assert torch.equal(tensor, pretrained.state_dict()[key]), key
    assert model.text_model.pooler is None  # text_pooling "cls" keeps no unused pooler


@pytest.mark.parametrize("name", TOWERS)
def test_save_and_reload_give_the_same_logits(checkpoints, tmp_path, name):
    model = BertCLIPModel.from_pretrained(checkpoints[name]).eval()
    saved = json.loads((checkpoints[name] / "config.json").read_text())
    assert saved["model_type"] == "bert_clip" and saved["text_pooling"] == "mean"
    assert saved["text_config"]["model_type"] == {"roberta": "xlm-roberta", "ernie": "ernie"}[name]
    model.save_pretrained(tmp_path)
    reloaded, info = BertCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(reloaded.text_model) is TOWERS[name]
    inputs = make_inputs(checkpoints[name])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, reloaded.eval()(**inputs).logits_per_image)


@pytest.mark.parametrize("name", TOWERS)
def test_processor_reloads_through_auto_processor(checkpoints, text_towers, name):
    processor = AutoProcessor.from_pretrained(checkpoints[name])
    tokens = processor.tokenizer(TEXTS[1])["input_ids"]
    assert tokens == load_tokenizer(text_towers[name])(TEXTS[1])["input_ids"]
    assert processor.tokenizer.unk_token_id not in tokens
    assert type(processor.tokenizer) is type(load_processor(checkpoints[name]).tokenizer)


@pytest.mark.parametrize("name", TOWERS)
def test_mean_pooling_is_the_masked_mean(checkpoints, name):
    model = BertCLIPModel.from_pretrained(checkpoints[name]).eval()
    inputs = load_processor(checkpoints[name]).tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert not inputs["attention_mask"].all()  # the short texts are padded
    with torch.no_grad():
        features = model.get_text_features(**inputs)
        hidden = model.text_model(**inputs).last_hidden_state
    for row, mask in enumerate(inputs["attention_mask"]):
        kept = hidden[row, mask.bool()]  # [tokens kept, hidden]
        expected = model.text_projection(kept.sum(dim=0) / len(kept))
        torch.testing.assert_close(features[row], expected)


def test_token_type_ids_reach_only_towers_that_have_token_types(checkpoints):
    received = {}
    for name, checkpoint in checkpoints.items():
        model = BertCLIPModel.from_pretrained(checkpoint).eval()

        def record(module, args, kwargs, name=name):
            received[name] = kwargs.get("token_type_ids")

        model.text_model.register_forward_pre_hook(record, with_kwargs=True)
        ids = torch.tensor([[2, 100, 200, 3]])
        with torch.no_grad():
            model.get_text_features(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert received["roberta"] is None  # XLM-R has a single token type
    assert torch.equal(received["ernie"], torch.zeros(1, 4, dtype=torch.long))


def test_text_model_matches_the_full_model(checkpoints):
    model = BertCLIPModel.from_pretrained(checkpoints["roberta"]).eval()
    text_model = BertCLIPTextModel.from_pretrained(checkpoints["roberta"]).eval()
    inputs = load_processor(checkpoints["roberta"]).tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = text_model(**inputs)
        torch.testing.assert_close(output.text_embeds, model.get_text_features(**inputs))
    assert output.pooler_output is None


def test_pooler_pooling_is_refused_for_a_tower_without_a_pooler():
    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    with pytest.raises(CheckpointError, match="DistilBertModel has none"):
        build_text_tower(config, "pooler")
    assert build_text_tower(config, "mean") is not None


def test_text_tower_export_loads_with_auto_model(checkpoints, tmp_path):
    model = BertCLIPModel.from_pretrained(checkpoints["roberta"]).eval()
    model.save_text_tower(tmp_path, load_processor(checkpoints["roberta"]).tokenizer)
    tower = AutoModel.from_pretrained(tmp_path)
    assert type(tower) is XLMRobertaModel
    for key, tensor in model.text_model.state_dict().items():
        assert torch.equal(tensor, tower.state_dict()[key]), key


def test_chinese_clip_export_refuses_a_non_bert_tower(checkpoints):
    with pytest.raises(CheckpointError, match="its text tower is BERT"):
        BertCLIPModel.from_pretrained(checkpoints["ernie"]).to_chinese_clip()


# --- the scripts end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """16 training and 8 test images of coloured shapes with Chinese captions."""
    return write_shapes(tmp_path_factory.mktemp("tower_shapes"), train=16, test=8)


@pytest.mark.parametrize("name", TOWERS)
def test_train_predict_and_index_end_to_end(tiny_towers, text_towers, shapes_data, tmp_path, capsys, name):
    towers = {"clip": tiny_towers["clip"], "bert": text_towers[name]}
    output = tmp_path / "run"
    values = tiny_run_args(towers, shapes_data, output, max_steps=2, text_pooling="mean")
    metrics = train_clip.main(["--train_args_file", str(write_args(tmp_path / "args.json", **values))])
    assert "eval_mean_recall" in metrics
    model = BertCLIPModel.from_pretrained(output)
    assert type(model.text_model) is TOWERS[name] and model.config.text_pooling == "mean"

    image = tmp_path / "query.png"  # a PNG: JPEGs are decoded at a reduced scale (draft mode)
    Image.open(shapes_data / "images" / "test-0.jpg").save(image)
    capsys.readouterr()
    predict_similarity.main(["--model_name_or_path", str(output), "--images", str(image), "--texts", *TEXTS,
                             "--json", "--device", "cpu"])  # fmt: skip
    cosine = torch.tensor(json.loads(capsys.readouterr().out)["cosine"])
    inputs = load_processor(output)(text=TEXTS, images=[Image.open(image)], return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    torch.testing.assert_close(cosine, outputs.image_embeds @ outputs.text_embeds.T, atol=1e-5, rtol=0)

    index = tmp_path / "index"
    retrieval.main(["index", "--model_name_or_path", str(output), "--output", str(index),
                    "--images_dir", str(shapes_data / "images"), "--device", "cpu"])  # fmt: skip
    capsys.readouterr()
    retrieval.main(["search", "--index", str(index), "--text", TEXTS[2], "--json", "--device", "cpu"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert results and all(result["filename"].endswith(".jpg") for result in results)


def test_the_usable_text_length_leaves_out_roberta_position_offsets(checkpoints):
    roberta = BertCLIPModel.from_pretrained(checkpoints["roberta"]).config.text_config
    ernie = BertCLIPModel.from_pretrained(checkpoints["ernie"]).config.text_config
    assert max_text_length(roberta) == roberta.max_position_embeddings - roberta.pad_token_id - 1
    assert max_text_length(ernie) == ernie.max_position_embeddings


def test_to_cn_clip_refuses_a_text_tower_other_than_bert(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_checkpoint.main(
            ["to-cn-clip", "--model", str(checkpoints["roberta"]), "--output", str(tmp_path / "x.pt")]
        )
    assert "text tower 'xlm-roberta' (cn_clip: BERT)" in capsys.readouterr().err
