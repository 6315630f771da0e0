"""Training with the loss chosen by name: the model prepared for it, the trainer's use of it, and
duplicate captions (found in the data, and kept from being each other's negatives)."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from _runs import tiny_run_args, write_args

import train_clip
from component.loss import LOSSES, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, get_loss, siglip_loss
from component.model import BertCLIPModel
from component.training.arg_values import ArgumentError
from component.training.dataset import ImageTextDataset, StringColumn, read_image_text_csv
from component.training.freezing import parameter_groups
from component.training.losses import (
    count_duplicate_captions,
    prepare_model_for_loss,
    same_caption_mask,
    warn_about_duplicate_captions,
    warn_about_duplicate_captions_in,
)
from component.training.trainer import LogitScaleClampCallback


def test_siglip_gives_a_model_without_a_bias_the_siglip_start(tiny_model):
    assert tiny_model.logit_bias is None
    prepare_model_for_loss(tiny_model, "siglip")
    assert tiny_model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(10))
    prepare_model_for_loss(tiny_model, "siglip")  # a second call changes nothing
    assert tiny_model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS


def test_a_model_continued_from_a_siglip_checkpoint_keeps_its_scales(tiny_model, tmp_path):
    tiny_model.add_logit_bias(2.0, -3.5)
    tiny_model.save_pretrained(tmp_path / "siglip")
    model = BertCLIPModel.from_pretrained(tmp_path / "siglip")
    prepare_model_for_loss(model, "siglip")
    assert (model.logit_scale.item(), model.logit_bias.item()) == (2.0, -3.5)


def test_the_clip_loss_refuses_a_model_with_a_bias(tiny_model):
    tiny_model.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    with pytest.raises(ArgumentError, match=r"trained with the sigmoid loss .* set \"loss\": \"siglip\""):
        prepare_model_for_loss(tiny_model, "clip")


def test_the_scale_is_clamped_for_clip_but_not_for_siglip(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(5.0)
    LogitScaleClampCallback().on_step_end(None, None, None, model=tiny_model)
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(100))
    tiny_model.add_logit_bias(5.0, -10.0)
    LogitScaleClampCallback().on_step_end(None, None, None, model=tiny_model)
    assert tiny_model.logit_scale.item() == 5.0


def test_the_logit_bias_is_not_weight_decayed_and_trains_at_the_main_rate(tiny_model):
    tiny_model.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    groups = parameter_groups(tiny_model, learning_rate=1e-3, weight_decay=0.1)
    (group,) = [g for g in groups if any(p is tiny_model.logit_bias for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["lr"] == 1e-3
    assert any(p is tiny_model.logit_scale for p in group["params"])


def test_same_caption_mask_compares_tokens_not_padding():
    # Rows 0 and 2 are one caption; row 1 is that caption plus a token whose id is 0 (a real
    # token in XLM-R), which must not pass for padding; row 3 differs.
    input_ids = torch.tensor([[5, 6, 0, 0], [5, 6, 0, 0], [5, 6, 0, 0], [5, 7, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_caption_mask(input_ids, attention_mask), expected)


def test_duplicate_captions_are_counted_and_warned_about(caplog):
    texts = StringColumn(["红色", "绿色", "红色", "蓝色", "红色", "绿色", "黑色"])
    assert count_duplicate_captions(texts) == (5, 2)
    assert count_duplicate_captions(texts.tolist()) == (5, 2)
    with caplog.at_level(logging.INFO):
        assert warn_about_duplicate_captions(texts, "train.csv", dedupe_captions=False) == 5
    assert "train.csv: 5 of 7 rows share their caption with another row (2 captions repeat)" in caplog.text
    assert "dedupe_captions_in_batch: true" in caplog.text
    caplog.clear()
    assert warn_about_duplicate_captions(StringColumn(["一", "二"]), "train.csv", False) == 0
    assert not caplog.text


def test_duplicate_captions_are_found_in_a_csv_training_dataset(tmp_path, caplog):
    csv = tmp_path / "train.csv"
    csv.write_text("text,filename\n红色,a.jpg\n绿色,b.jpg\n红色,c.jpg\n")
    dataset = ImageTextDataset(read_image_text_csv(csv), tmp_path)
    assert warn_about_duplicate_captions_in(dataset, str(csv), dedupe_captions=False) == 2
    assert "2 of 3 rows share their caption" in caplog.text
    assert warn_about_duplicate_captions_in(object(), "stream", dedupe_captions=False) == 0


class LossSpy:
    """Wraps the siglip loss and records what each call was given and returned."""

    def __init__(self):
        self.calls = []

    def __call__(self, image_embeds, text_embeds, logit_scale, logit_bias, same_caption=None):
        loss = siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias, same_caption=same_caption)
        self.calls.append({"rows": len(image_embeds), "bias": logit_bias, "mask": same_caption,
                           "loss": loss.item()})  # fmt: skip
        return loss


def test_training_and_evaluation_use_the_loss_named_in_the_arg_file(
    tiny_towers, shapes, tmp_path, monkeypatch
):
    spy = LossSpy()
    monkeypatch.setitem(LOSSES, "siglip", spy)
    values = tiny_run_args(
        tiny_towers, shapes, tmp_path / "run", loss="siglip", dedupe_captions_in_batch=True, max_steps=2
    )
    metrics = train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    training, evaluation = spy.calls[:2], spy.calls[2:]
    assert all(call["bias"] is not None for call in spy.calls)
    assert [call["mask"].shape for call in spy.calls] == [(8, 8), (8, 8), (16, 16)]
    assert metrics["train_loss"] == pytest.approx(sum(call["loss"] for call in training) / 2, rel=1e-5)
    assert [call["rows"] for call in evaluation] == [16]  # the 16 test rows in one batch
    assert metrics["eval_loss"] == pytest.approx(evaluation[0]["loss"], rel=1e-5)
    saved = BertCLIPModel.from_pretrained(tmp_path / "run")
    assert saved.uses_sigmoid and saved.config.logit_bias_init_value is not None


def test_gradient_cached_training_uses_the_chosen_loss_over_all_micro_batches(
    tiny_towers, shapes, tmp_path, monkeypatch
):
    spy = LossSpy()
    monkeypatch.setitem(LOSSES, "siglip", spy)
    options = {"loss": "siglip", "dedupe_captions_in_batch": True, "contrastive_accumulation_steps": 2}
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", max_steps=1, test_file=None, **options)
    metrics = train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    (call,) = spy.calls  # one loss over both micro-batches of 4 rows
    assert call["rows"] == 8 and call["mask"].shape == (8, 8) and call["bias"] is not None
    assert metrics["train_loss"] == pytest.approx(call["loss"], rel=1e-5)


def train_class_name_toy(loss_name: str, dedupe: bool, steps: int = 20, seed: int = 0) -> dict:
    """Two linear towers trained on captions that are class names (6 classes, batch 32: every batch
    repeats each caption about 5 times); held-out accuracy and the score of the right class."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prototypes = torch.randn(6, 16, generator=generator)

    def images(labels):
        return prototypes[labels] + torch.randn(len(labels), 16, generator=generator)

    image_tower, text_tower = torch.nn.Linear(16, 8), torch.nn.Embedding(6, 8)
    siglip = loss_name == "siglip"
    scale = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_SCALE if siglip else math.log(1 / 0.07)))
    bias = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)) if siglip else None
    parameters = [*image_tower.parameters(), *text_tower.parameters(), scale, *([bias] if siglip else [])]
    optimizer = torch.optim.Adam(parameters, lr=0.05)
    for _ in range(steps):
        labels = torch.randint(6, (32,), generator=generator)
        same_caption = labels.unsqueeze(1) == labels.unsqueeze(0) if dedupe else None
        image_embeds = F.normalize(image_tower(images(labels)), dim=-1)
        text_embeds = F.normalize(text_tower(labels), dim=-1)
        loss = get_loss(loss_name)(image_embeds, text_embeds, scale, bias, same_caption=same_caption)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        labels = torch.arange(6).repeat(50)
        logits = (
            scale.exp() * F.normalize(image_tower(images(labels)), dim=-1) @ F.normalize(text_tower.weight).T
        )
        scores = torch.sigmoid(logits + bias) if siglip else logits.softmax(dim=1)
        right = scores[torch.arange(len(labels)), labels]
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return {"accuracy": accuracy, "right_class_score": right.mean().item(), "train_loss": loss.item()}


def test_deduping_class_name_captions_trains_the_scores_each_loss_promises():
    runs = {
        (name, dedupe): train_class_name_toy(name, dedupe) for name in ("clip", "siglip") for dedupe in (0, 1)
    }
    for name in ("clip", "siglip"):
        plain, deduped = runs[name, 0], runs[name, 1]
        assert deduped["accuracy"] >= plain["accuracy"] - 0.02 and deduped["accuracy"] > 0.9, name
        assert deduped["right_class_score"] > plain["right_class_score"], name
    # Without dedupe the sigmoid loss is told that ~4 of an image's 5 same-caption texts do not
    # match, so the right class name gets a low match probability; with it, a high one.
    assert runs["siglip", 0]["right_class_score"] < 0.3 < 0.8 < runs["siglip", 1]["right_class_score"]
    # The softmax loss cannot go below log(duplicates) without dedupe; with it, it can.
    assert runs["clip", 1]["train_loss"] < 0.5 * runs["clip", 0]["train_loss"]
