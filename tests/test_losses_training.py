"""Training with the loss chosen by name: the model prepared for it, the trainer's use of it, and
duplicate captions (found in the data, and kept from being each other's negatives)."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from _runs import tiny_run_args, write_args

import train_clip
from component.evaluation.metrics import retrieval_metrics
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


CLASSES, BATCH = 16, 128  # every batch repeats each class-name caption about 8 times


def train_on_class_names(loss_name: str, dedupe: bool, seed: int, steps: int = 300) -> dict:
    """A linear image tower and a text tower of one embedding per caption, trained on captions that
    are class names; the toolkit's recall on held-out images of every class, the score given to
    each image's own class name, and the last training loss.

    The text tower sees token ids ([CLS] class [SEP]), so the same-caption mask comes from
    `same_caption_mask`, as in training. Identical captions give identical text embeddings in any
    tower, which is all that duplicate captions change.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prototypes = torch.randn(CLASSES, 32, generator=generator)

    def images(labels):
        return prototypes[labels] + 1.5 * torch.randn(len(labels), 32, generator=generator)

    image_tower, text_tower = torch.nn.Linear(32, 16), torch.nn.Embedding(CLASSES, 16)
    siglip = loss_name == "siglip"
    scale = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_SCALE if siglip else math.log(1 / 0.07)))
    bias = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)) if siglip else None
    parameters = [*image_tower.parameters(), *text_tower.parameters(), scale, *([bias] if siglip else [])]
    optimizer = torch.optim.Adam(parameters, lr=0.003)
    for _ in range(steps):
        labels = torch.randint(CLASSES, (BATCH,), generator=generator)
        token_ids = torch.stack([torch.full_like(labels, 2), labels + 5, torch.full_like(labels, 3)], dim=1)
        same_caption = same_caption_mask(token_ids, torch.ones_like(token_ids)) if dedupe else None
        image_embeds = F.normalize(image_tower(images(labels)), dim=-1)
        text_embeds = F.normalize(text_tower(labels), dim=-1)
        loss = get_loss(loss_name)(image_embeds, text_embeds, scale, bias, same_caption=same_caption)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        labels = torch.arange(CLASSES).repeat(25)
        image_embeds = F.normalize(image_tower(images(labels)), dim=-1)
        text_embeds = F.normalize(text_tower.weight, dim=-1)  # each class name once
        class_images = [(labels == k).nonzero().flatten().tolist() for k in range(CLASSES)]
        recall = retrieval_metrics(image_embeds, text_embeds, class_images)
        logits = scale.exp() * image_embeds @ text_embeds.T
        scores = torch.sigmoid(logits + bias) if siglip else logits.softmax(dim=1)
        own_class_score = scores[torch.arange(len(labels)), labels].mean().item()
    return {**recall, "own_class_score": own_class_score, "train_loss": loss.item()}


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_deduping_class_name_captions_improves_held_out_recall(loss_name):
    seeds = range(6)
    plain = [train_on_class_names(loss_name, dedupe=False, seed=seed) for seed in seeds]
    deduped = [train_on_class_names(loss_name, dedupe=True, seed=seed) for seed in seeds]

    def mean(runs, name):
        return sum(run[name] for run in runs) / len(runs)

    for name in ("i2t_recall@1", "mean_recall"):
        wins = sum(d[name] > p[name] for p, d in zip(plain, deduped, strict=True))
        assert wins >= 5, (name, wins)  # same seeds, same batches: only the mask differs
    assert mean(deduped, "i2t_recall@1") > mean(plain, "i2t_recall@1") + 0.01
    assert mean(deduped, "mean_recall") > mean(plain, "mean_recall")
    # What the loss promises improves by far more: the softmax loss can go below
    # log(duplicates), and SigLIP, no longer told that ~7 of 8 same-caption pairs do not match,
    # gives the right class name a far higher match probability.
    assert mean(deduped, "own_class_score") > mean(plain, "own_class_score") + 0.1
    assert mean(deduped, "train_loss") < 0.6 * mean(plain, "train_loss")
