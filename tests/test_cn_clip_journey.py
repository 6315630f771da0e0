"""A Chinese-CLIP user's whole path, checked against cn_clip's own code at both ends: convert a
trainer checkpoint, evaluate it on a MUGE-style split, fine-tune it here (LiT, then the image tower
unlocked), evaluate the result, and take it back to cn_clip, with the same numbers on both sides."""

import io
import json

import pytest
import torch
from _runs import write_args
from PIL import Image

# The fixtures cn_clip and muge_split are the ones those modules' tests use.
from test_cn_clip import HEAD_WIDTHS, VOCAB, cn_clip, save_as_trainer, tiny_cn_clip  # noqa: F401
from test_evaluate import N_IMAGES, cn_clip_scores, draw, muge_split, run_evaluate  # noqa: F401

import convert_checkpoint
import train_clip
from component.model import BertCLIPModel
from component.processor import load_processor, preprocess_images

TOLERANCE = 1e-4  # on percentages, as the parity checks


def cn_clip_numbers(cn, model, processor, split, directory) -> dict[str, float]:
    """What cn_clip's extract_features.py and evaluation scripts report for `model` on `split`:
    its tokenize() (over the model's vocabulary, set up by the caller), the model's own encoders,
    top-10 predictions scored by evaluation(_tr).py, and MR, the mean of the six recalls.

    Pixels come from the converted processor: cn_clip's transform needs torchvision, and
    test_cn_clip checks that the two resize and normalise alike."""
    texts = [json.loads(line)["text"] for line in split.read_text(encoding="utf-8").splitlines()]
    images = [Image.open(io.BytesIO(draw(number))) for number in range(N_IMAGES)]
    with torch.no_grad():
        text_features = model.encode_text(cn.utils.tokenize(texts, context_length=52))
        image_features = model.encode_image(preprocess_images(processor, images))
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    directory.mkdir(parents=True, exist_ok=True)
    scores = cn_clip_scores(text_features, image_features, directory)
    six = [scores[f"{direction}_r{k}"] for direction in ("t2i", "i2t") for k in (1, 5, 10)]
    return {**scores, "mean_recall": sum(six) / 6}


def muge_vocabulary(split, path):
    """test_cn_clip's vocabulary plus every character of the split's texts, so that no two texts
    tokenise alike (as [UNK]s) and no ranking is decided by a tie."""
    texts = "".join(json.loads(line)["text"] for line in split.read_text(encoding="utf-8").splitlines())
    words = [*VOCAB, *sorted(set(texts) - set(VOCAB))]
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path, len(words)


def load_as_extract_features_does(cn, checkpoint):
    """A cn_clip CLIP built from the model configs beside `checkpoint`, its state loaded as
    extract_features.py --resume loads it (the `module.` prefix and the BERT pooler dropped)."""
    info = {}
    for config in sorted(checkpoint.parent.glob(f"{checkpoint.stem}-*.json")):
        info.update(json.loads(config.read_text()))
    model = cn.model.CLIP(**info)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    if next(iter(state)).startswith("module"):
        state = {k[len("module.") :]: v for k, v in state.items() if "bert.pooler" not in k}
    model.load_state_dict(state)
    return model.eval()


def fine_tune(model_dir, split, output_dir, tmp_path):
    values = {
        "output_dir": str(output_dir),
        "model_name_or_path": str(model_dir),
        "train_file": str(split),
        "test_file": str(split),
        "max_seq_length": 52,
        "unlock_vision_at": 2,  # Chinese-CLIP's two stages: the image tower joins at step 2
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-3,
        "vision_learning_rate": 1e-3,
        "max_steps": 6,
        "save_strategy": "no",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 3,
    }
    train_clip.main(["--train_args_file", str(write_args(tmp_path / "finetune.json", **values))])


def test_convert_evaluate_fine_tune_evaluate_and_back_with_cn_clip_numbers_at_both_ends(
    cn_clip,  # noqa: F811 (the imported fixtures)
    muge_split,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    vocab_file, vocab_size = muge_vocabulary(muge_split, tmp_path / "vocab.txt")
    monkeypatch.setattr(cn_clip.utils, "_tokenizer", cn_clip.tokenizer.FullTokenizer(str(vocab_file)))
    original = tiny_cn_clip(cn_clip, seed=5, vocab_size=vocab_size)
    checkpoint = save_as_trainer(original, tmp_path / "epoch_latest.pt")
    converted = tmp_path / "converted"
    convert_checkpoint.main(["from-cn-clip", "--checkpoint", str(checkpoint), "--output", str(converted),
                             "--vocab_file", str(vocab_file), *HEAD_WIDTHS])  # fmt: skip
    processor = load_processor(converted)
    before = run_evaluate(["--model_name_or_path", str(converted), "--test_file", str(muge_split)], tmp_path)
    expected = cn_clip_numbers(cn_clip, original, processor, muge_split, tmp_path / "before")
    assert before["cn_clip"] == pytest.approx(expected, abs=TOLERANCE)

    fine_tune(converted, muge_split, tmp_path / "tuned", tmp_path)
    start, tuned = BertCLIPModel.from_pretrained(converted), BertCLIPModel.from_pretrained(tmp_path / "tuned")
    for tower in ("vision_model", "text_model"):  # both towers trained: the second stage ran
        assert not torch.equal(
            next(getattr(start, tower).parameters()), next(getattr(tuned, tower).parameters())
        ), tower
    after = run_evaluate(["--model_name_or_path", str(tmp_path / "tuned")], tmp_path)  # no other flags
    assert after["data"]["test_file"] == str(muge_split)

    back = tmp_path / "back" / "epoch_latest.pt"
    convert_checkpoint.main(["to-cn-clip", "--model", str(tmp_path / "tuned"), "--output", str(back)])
    returned = load_as_extract_features_does(cn_clip, back)
    expected = cn_clip_numbers(cn_clip, returned, processor, muge_split, tmp_path / "after")
    assert after["cn_clip"] == pytest.approx(expected, abs=TOLERANCE)
    assert after["cn_clip"] != before["cn_clip"]  # the fine-tuning changed what cn_clip measures
