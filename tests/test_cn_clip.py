"""Chinese-CLIP (OFA-Sys cn_clip) checkpoints and evaluation, checked against cn_clip's own code.

Needs cn_clip installed without its dependencies (pip install --no-deps cn_clip six): its
cn_clip/clip/utils.py imports torchvision at import time, which does not install beside this
torch. The `cn_clip` fixture therefore imports it with a stub torchvision in sys.modules (its
transforms are only used by `image_transform`, which these tests replace by hand) and removes the
stub again at once.
"""

import ast
import importlib.machinery
import importlib.util
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ChineseCLIPModel

import convert_checkpoint
from component.encoding import load_model_and_processor
from component.evaluation.cn_clip_protocol import cn_clip_retrieval_metrics
from component.formats import cn_clip as cn_clip_format
from component.formats.cn_clip import CnClipArchitecture, infer_architecture
from component.formats.cn_clip_convert import (
    CN_CLIP_IMAGE_MEAN,
    CN_CLIP_IMAGE_STD,
    SHIPPED_TEXT_CONFIGS,
    SHIPPED_VISION_CONFIGS,
    cn_clip_processor,
    shipped_config_name,
)
from component.model import BertCLIPModel
from component.processor import load_processor, preprocess_images

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cn_clip") is None, reason="needs cn_clip: pip install --no-deps cn_clip six"
)

TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形", "猫和狗"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一只猫两狗在草地上奔跑红色的圆形和", "a", "b"]
TOLERANCE = 1e-4
# A tiny cn_clip CLIP: 32 px images in 8 px patches, 2 layers of width 32 in both towers, heads of 8.
TINY = dict(
    embed_dim=16, image_resolution=32, vision_layers=2, vision_width=32, vision_patch_size=8,
    vision_head_width=8, vocab_size=len(VOCAB), text_attention_probs_dropout_prob=0.1,
    text_hidden_act="gelu", text_hidden_dropout_prob=0.1, text_hidden_size=32,
    text_initializer_range=0.02, text_intermediate_size=64, text_max_position_embeddings=64,
    text_num_attention_heads=4, text_num_hidden_layers=2, text_type_vocab_size=2,
)  # fmt: skip
HEAD_WIDTHS = ["--vision_head_width", "8", "--text_head_width", "8"]


def _torchvision_stub() -> dict[str, types.ModuleType]:
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "ToTensor", "Normalize", "Resize"):
        setattr(transforms, name, lambda *args, **kwargs: None)
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    for module in (torchvision, transforms):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return {"torchvision": torchvision, "torchvision.transforms": transforms}


@pytest.fixture(scope="module")
def cn_clip():
    """cn_clip's modules: `model` (CLIP, convert_state_dict), `utils` (load_from_name), `tokenizer`, evals."""
    with pytest.MonkeyPatch.context() as patch:
        for name, module in _torchvision_stub().items():
            patch.setitem(sys.modules, name, module)
        import cn_clip.clip.bert_tokenizer as tokenizer
        import cn_clip.clip.model as model
        import cn_clip.clip.utils as utils
        import cn_clip.eval.evaluation as evaluation
        import cn_clip.eval.evaluation_tr as evaluation_tr
    return types.SimpleNamespace(
        model=model, utils=utils, tokenizer=tokenizer, evaluation=evaluation, evaluation_tr=evaluation_tr
    )


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def tiny_cn_clip(cn_clip, seed: int = 0, **overrides):
    """A tiny cn_clip CLIP with every weight perturbed, so that no bias or norm is trivially 0 or 1."""
    torch.manual_seed(seed)
    model = cn_clip.model.CLIP(**{**TINY, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def save_as_trainer(model, path: Path, prefix: str = "module.", state: dict | None = None) -> Path:
    """Save as cn_clip's training/main.py does, optimizer state included."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model.logit_scale.sum().backward()
    optimizer.step()
    state = state if state is not None else model.state_dict()
    torch.save(
        {
            "epoch": 2,
            "step": 10,
            "name": "tiny",
            "state_dict": {prefix + key: value for key, value in state.items()},
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    return path


def text_ids(processor) -> torch.Tensor:
    return processor.tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt").input_ids


def cn_clip_logits(model, pixel_values, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.get_similarity(pixel_values, input_ids)[0]


def our_logits(model, pixel_values, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=(input_ids != 0).long(), pixel_values=pixel_values
        ).logits_per_image


@pytest.fixture(scope="module")
def converted(cn_clip, vocab_file, tmp_path_factory):
    """A tiny cn_clip model and the toolkit directory from-cn-clip wrote for its trainer checkpoint."""
    root = tmp_path_factory.mktemp("from_cn_clip")
    reference = tiny_cn_clip(cn_clip)
    checkpoint = save_as_trainer(reference, root / "epoch_latest.pt")
    convert_checkpoint.main(["from-cn-clip", "--checkpoint", str(checkpoint), "--output", str(root / "model"),
                             "--vocab_file", str(vocab_file), *HEAD_WIDTHS])  # fmt: skip
    return reference, root / "model"


def test_from_cn_clip_gives_cn_clip_logits(converted, cn_clip, vocab_file):
    reference, directory = converted
    model, processor = load_model_and_processor(directory, "cpu")
    ids = text_ids(processor)
    expected = [[2, *cn_clip.tokenizer.FullTokenizer(str(vocab_file)).convert_tokens_to_ids(list(t)), 3]
                for t in TEXTS]  # fmt: skip
    assert [row[row != 0].tolist() for row in ids] == expected
    pixel_values = torch.randn(3, 3, 32, 32)
    difference = our_logits(model, pixel_values, ids) - cn_clip_logits(reference, pixel_values, ids)
    assert difference.abs().max().item() <= TOLERANCE
    assert model.config.text_pooling == "cls"


def test_from_cn_clip_reads_flash_attention_keys_without_module_prefix(cn_clip, vocab_file, tmp_path):
    reference = tiny_cn_clip(cn_clip, seed=1)
    # The key names of a model built with use_flash_attention, made by cn_clip's own renaming.
    flash_state = cn_clip.model.convert_state_dict(dict(reference.state_dict()))
    assert any(".attn.Wqkv." in key for key in flash_state)
    assert any(".attention.self.Wqkv." in key for key in flash_state)
    checkpoint = save_as_trainer(reference, tmp_path / "flash.pt", prefix="", state=flash_state)
    convert_checkpoint.main(["from-cn-clip", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m"),
                             "--vocab_file", str(vocab_file), *HEAD_WIDTHS])  # fmt: skip
    model, processor = load_model_and_processor(tmp_path / "m", "cpu")
    ids, pixel_values = text_ids(processor), torch.randn(2, 3, 32, 32)
    difference = our_logits(model, pixel_values, ids) - cn_clip_logits(reference, pixel_values, ids)
    assert difference.abs().max().item() <= TOLERANCE


def test_processor_resizes_to_a_square_without_crop_as_cn_clip(converted):
    processor = load_processor(converted[1])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    # cn_clip's image_transform: Resize((32, 32), BICUBIC), ToTensor, Normalize(mean, std).
    resized = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (
        torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(CN_CLIP_IMAGE_MEAN)[:, None, None]
    ) / (torch.tensor(CN_CLIP_IMAGE_STD)[:, None, None])
    assert (preprocess_images(processor, [image])[0] - expected).abs().max().item() < 1e-5
    assert (processor(images=[image], return_tensors="pt").pixel_values[0] - expected).abs().max() < 1e-5


def test_default_vocabulary_tokenizes_as_cn_clip(cn_clip):
    processor = cn_clip_processor(cn_clip_format.default_vocab_file(), 224, 512)
    texts = ["一只可爱的猫 in the Garden", "2023年，北京！", "ＡＢＣ全角字母"]
    ids = processor.tokenizer(texts, padding="max_length", max_length=52, return_tensors="pt").input_ids
    assert torch.equal(ids, cn_clip.utils.tokenize(texts, context_length=52))


def cn_clip_text_cleaning():
    """cn_clip's `_preprocess_text`, read from its training and evaluation data loaders (importing
    them needs torchvision); the two must be the same function."""
    package = Path(importlib.util.find_spec("cn_clip").origin).parent
    sources = []
    for loader in ("training/data.py", "eval/data.py"):
        tree = ast.parse((package / loader).read_text(encoding="utf-8"))
        (function,) = [
            n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_preprocess_text"
        ]
        sources.append(ast.unparse(function))
    assert sources[0] == sources[1]
    namespace = {}
    exec(sources[0], namespace)
    return namespace["_preprocess_text"]


def test_converted_tokenizer_cleans_quotes_as_cn_clip_loaders_do_after_a_reload(cn_clip, tmp_path):
    preprocess_text = cn_clip_text_cleaning()
    texts = ["他说“你好”", "“ABC”牌的猫", '已是"直引号"的文本']
    cn_clip_processor(cn_clip_format.default_vocab_file(), 224, 512).save_pretrained(tmp_path)
    tokenizer = load_processor(tmp_path).tokenizer
    ids = tokenizer(texts, padding="max_length", max_length=52, return_tensors="pt").input_ids
    expected = cn_clip.utils.tokenize([preprocess_text(t) for t in texts], context_length=52)
    assert torch.equal(ids, expected)
    # The vocabulary has the curly quotes too, so without the clean-up the ids would differ.
    assert not torch.equal(expected[:2], cn_clip.utils.tokenize(texts[:2], context_length=52))


def test_to_cn_clip_loads_with_load_from_name_and_equal_logits(
    cn_clip, converted, tmp_path, monkeypatch, capsys
):
    # A BertCLIP model of its own (not a round trip), in the architecture cn_clip can express.
    torch.manual_seed(3)
    config = CnClipArchitecture(
        **{k: v for k, v in TINY.items() if not k.endswith(("_act", "_prob", "_range"))}
    )
    model = BertCLIPModel(config.bert_clip_config(logit_scale=2.0)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            # load_from_name rounds the weights through float16 (create_model's convert_weights);
            # weights that float16 holds exactly make that lossless, so logits can match to 1e-4.
            parameter.add_(0.05 * torch.randn_like(parameter)).copy_(parameter.half().float())
    model.save_pretrained(tmp_path / "model")
    load_processor(converted[1]).save_pretrained(tmp_path / "model")
    output = tmp_path / "out" / "epoch_latest.pt"
    convert_checkpoint.main(["to-cn-clip", "--model", str(tmp_path / "model"), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "epoch_latest-ViT.json" in printed and "vision_model_name='epoch_latest-ViT'" in printed
    # cn_clip reads model configs from the model_configs folder beside its utils.py only.
    package = tmp_path / "cn_clip_package"
    (package / "model_configs").mkdir(parents=True)
    for name in ("epoch_latest-ViT.json", "epoch_latest-BERT.json"):
        (package / "model_configs" / name).write_text((output.parent / name).read_text())
    monkeypatch.setattr(cn_clip.utils, "__file__", str(package / "utils.py"))
    names = dict(vision_model_name="epoch_latest-ViT", text_model_name="epoch_latest-BERT")
    reference, _ = cn_clip.utils.load_from_name(str(output), device="cpu", input_resolution=32, **names)
    ids, pixel_values = text_ids(load_processor(converted[1])), torch.randn(3, 3, 32, 32)
    difference = our_logits(model, pixel_values, ids) - cn_clip_logits(reference.eval(), pixel_values, ids)
    assert difference.abs().max().item() <= TOLERANCE


def test_chinese_clip_round_trip_keeps_logits(converted, tmp_path):
    model, processor = load_model_and_processor(converted[1], "cpu")
    convert_checkpoint.main(
        ["to-chinese-clip", "--model", str(converted[1]), "--output", str(tmp_path / "hf")]
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "chinese_clip"
    chinese = ChineseCLIPModel.from_pretrained(tmp_path / "hf").eval()
    convert_checkpoint.main(
        ["from-chinese-clip", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]
    )
    back, back_processor = load_model_and_processor(tmp_path / "back", "cpu")
    image = Image.new("RGB", (40, 30), "teal")
    inputs = dict(processor(text=TEXTS, images=[image], return_tensors="pt", padding=True))
    back_inputs = dict(back_processor(text=TEXTS, images=[image], return_tensors="pt", padding=True))
    assert all(torch.equal(inputs[key], back_inputs[key]) for key in inputs)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        assert (chinese(**inputs).logits_per_image - expected).abs().max().item() <= TOLERANCE
        assert (back(**inputs).logits_per_image - expected).abs().max().item() <= TOLERANCE


def test_architecture_is_read_from_the_shapes_of_every_shipped_config(cn_clip):
    config_dir = Path(cn_clip.utils.__file__).parent / "model_configs"
    for vision_name, text_name in [
        info["struct"].split("@") for info in cn_clip.utils._MODEL_INFO.values()
    ] + [("ViT-B-32", "RBT3-chinese")]:
        if vision_name == "RN50":
            continue
        vision = json.loads((config_dir / f"{vision_name}.json").read_text())
        text = json.loads((config_dir / f"{text_name}.json").read_text())
        with torch.device("meta"):  # shapes only, no memory
            state = cn_clip.model.CLIP(**vision, **text).state_dict()
        architecture = infer_architecture(state)
        assert architecture.vision_config_json() == {"vision_head_width": 64, **vision}, vision_name
        assert architecture.text_config_json() == text, text_name
        # to-cn-clip names these configs rather than writing its own.
        assert shipped_config_name(architecture.vision_config_json(), SHIPPED_VISION_CONFIGS) == vision_name
        assert shipped_config_name(architecture.text_config_json(), SHIPPED_TEXT_CONFIGS) == text_name


def run_failing(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main(argv)
    assert exit_info.value.code == 2
    # transformers' loading progress bar may come first on stderr; the error is one line after it.
    stderr = capsys.readouterr().err.rstrip("\n")
    error = stderr.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert error.startswith("error: ") and stderr.count("error") == error.count("error"), stderr
    return error


class NotATensor:
    pass


@pytest.mark.parametrize("content", ["text", "pickle", "dict"])
def test_a_file_that_is_no_cn_clip_checkpoint_is_one_line_error(content, vocab_file, tmp_path, capsys):
    path = tmp_path / "other.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": NotATensor()}, protocol=2))
    else:
        torch.save({"state_dict": {"weight": torch.zeros(2)}}, path)
    error = run_failing(["from-cn-clip", "--checkpoint", str(path), "--output", str(tmp_path / "m"),
                         "--vocab_file", str(vocab_file)], capsys)  # fmt: skip
    assert str(path) in error and "not a Chinese-CLIP checkpoint" in error


def test_resnet_tower_is_refused(cn_clip, vocab_file, tmp_path, capsys):
    resnet = tiny_cn_clip(cn_clip, vision_layers=(1, 1, 1, 1), vision_width=8, vision_head_width=64)
    checkpoint = save_as_trainer(resnet, tmp_path / "rn.pt")
    error = run_failing(["from-cn-clip", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m"),
                         "--vocab_file", str(vocab_file)], capsys)  # fmt: skip
    assert "ResNet" in error and str(checkpoint) in error


def test_missing_vocabulary_is_one_line_error(converted, tmp_path, capsys, monkeypatch):
    checkpoint = converted[1].parent / "epoch_latest.pt"
    missing = tmp_path / "nowhere" / "vocab.txt"
    command = ["from-cn-clip", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m")]
    assert str(missing) in run_failing([*command, "--vocab_file", str(missing)], capsys)
    monkeypatch.setattr(cn_clip_format, "installed_cn_clip_dir", lambda: None)
    assert "--vocab_file" in run_failing(command, capsys)
    assert not (tmp_path / "m").exists()


def test_to_cn_clip_refuses_a_model_cn_clip_cannot_express(tiny_checkpoint, tmp_path, capsys):
    error = run_failing(
        ["to-cn-clip", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "x.pt")], capsys
    )
    assert "image MLP width" in error and not (tmp_path / "x.pt").exists()


def test_to_cn_clip_refuses_a_siglip_model(tiny_checkpoint, tmp_path, capsys):
    model = BertCLIPModel.from_pretrained(tiny_checkpoint)
    model.add_logit_bias(2.3, -10.0)
    model.save_pretrained(tmp_path / "siglip")
    load_processor(tiny_checkpoint).save_pretrained(tmp_path / "siglip")
    error = run_failing(
        ["to-cn-clip", "--model", str(tmp_path / "siglip"), "--output", str(tmp_path / "x.pt")], capsys
    )
    assert (
        "a logit bias (a SigLIP model; Chinese-CLIP has none)" in error and not (tmp_path / "x.pt").exists()
    )


def test_retrieval_metrics_equal_cn_clip_evaluation_scripts(cn_clip, tmp_path):
    generator = torch.Generator().manual_seed(0)
    n_texts, n_images = 40, 25
    # Coarse scores so that ties occur; some texts have two images, some images no text.
    similarity = torch.randint(0, 6, (n_texts, n_images), generator=generator).float()
    text_to_images = [[i % 20] if i % 3 else [i % 20, 20 + i % 5] for i in range(n_texts)]
    metrics = cn_clip_retrieval_metrics(similarity, text_to_images)

    def write_jsonl(name: str, rows) -> str:
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(tmp_path / name)

    def top10(scores) -> list[int]:  # make_topk_predictions.py's ranking
        return [i for i, _ in sorted(enumerate(scores.tolist()), key=lambda pair: pair[1], reverse=True)[:10]]

    golden = write_jsonl(
        "t2i.jsonl", ({"text_id": t, "image_ids": ids} for t, ids in enumerate(text_to_images))
    )
    predicted = write_jsonl(
        "t2i_pred.jsonl", ({"text_id": t, "image_ids": top10(similarity[t])} for t in range(n_texts))
    )
    mean, r1, r5, r10 = cn_clip.evaluation.compute_score(golden, predicted)
    assert metrics["t2i_r1"] == pytest.approx(r1, abs=1e-4) and metrics["t2i_r10"] == pytest.approx(
        r10, abs=1e-4
    )
    assert metrics["t2i_r5"] == pytest.approx(r5, abs=1e-4)
    assert metrics["t2i_mean_recall"] == pytest.approx(mean, abs=1e-4)

    image_to_texts = {}  # transform_ir_annotation_to_tr.py
    for text, images in enumerate(text_to_images):
        for image in images:
            image_to_texts.setdefault(image, []).append(text)
    golden = write_jsonl("i2t.jsonl", ({"image_id": i, "text_ids": t} for i, t in image_to_texts.items()))
    predicted = write_jsonl(
        "i2t_pred.jsonl", ({"image_id": i, "text_ids": top10(similarity[:, i])} for i in range(n_images))
    )
    tr_mean, tr_r1, tr_r5, tr_r10 = cn_clip.evaluation_tr.compute_score(golden, predicted)
    assert [metrics[f"i2t_{k}"] for k in ("r1", "r5", "r10", "mean_recall")] == pytest.approx(
        [tr_r1, tr_r5, tr_r10, tr_mean], abs=1e-4
    )
    assert metrics["mean_recall"] == pytest.approx((r1 + r5 + r10 + tr_r1 + tr_r5 + tr_r10) / 6, abs=1e-4)
    assert 0 < r1 < 100 and 0 < tr_r1 < 100  # the check is not vacuous
