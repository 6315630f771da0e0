"""train_clip.py end to end on tiny data, plus its parts: arguments, locking, bad images, metrics, resume."""

import importlib.util
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import run_until_killed, tiny_run_args, write_args, write_shapes
from safetensors.torch import load_file
from transformers import AutoProcessor

import train_clip
from component.evaluation.metrics import retrieval_metrics
from component.model import BertCLIPModel
from component.processor import ImageTransform, load_processor
from component.training.arguments import ArgumentError, parse_train_args
from component.training.collator import ImageTextCollator
from component.training.dataset import ImageTextDataset, StringColumn, read_image_text_csv
from component.training.freezing import apply_tower_locks, parameter_groups, unlock_vision_tower
from component.training.loaders import dataset_retrieval_metrics
from component.training.run import run_training
from component.training.trainer import BadImageError, BadImageTracker, newest_complete_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """48 training and 20 test images of coloured shapes with Chinese captions."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), train=48, test=20)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted((REPO / "train_args").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config):
    raw = json.loads(config.read_text())
    if raw.get("deepspeed"):
        zero = json.loads((REPO / raw["deepspeed"]).read_text())
        assert zero["zero_optimization"]["stage"] == 2
    # bf16 and DeepSpeed need a GPU to validate, DeepSpeed its package too; the rest is checked as written.
    overrides = {} if torch.cuda.is_available() else {"bf16": False, "use_cpu": True}
    if not (torch.cuda.is_available() and importlib.util.find_spec("deepspeed")):
        overrides["deepspeed"] = None
    _, data_args, _, training_args = parse_train_args(config, overrides=overrides, check_files=False)
    assert training_args.remove_unused_columns is False
    assert data_args.train_file and training_args.output_dir


def test_misspelt_key_is_named(tmp_path):
    path = write_args(
        tmp_path / "a.json", output_dir="o", train_file="t.csv", image_path="i", learning_rat=1e-4
    )
    with pytest.raises(
        ArgumentError, match=r"a\.json: unknown key\(s\): learning_rat \(did you mean learning_rate\?\)"
    ):
        parse_train_args(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("unlock_vision_at", "soon", "unlock_vision_at must be a step number or 'plateau', got 'soon'"),
        ("max_bad_image_fraction", 2, "max_bad_image_fraction must be in"),
        ("text_pooling", "max", "text_pooling must be 'cls', 'pooler' or 'mean'"),
        ("loss", "sigmoid", "loss must be one of \\['clip', 'siglip'\\], got 'sigmoid'"),
    ],
)
def test_bad_values_fail_with_the_value(tmp_path, key, value, message):
    path = write_args(tmp_path / "a.json", output_dir="o", train_file="t.csv", image_path="i", **{key: value})
    with pytest.raises(ArgumentError, match=message):
        parse_train_args(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"per_device_train_batch_size": 2, "contrastive_accumulation_steps": 4}, "smaller than"),
        ({"deepspeed": "train_args/deepspeed/zero2.json", "contrastive_accumulation_steps": 2},
         "contrastive_accumulation_steps is not supported with deepspeed"),
        ({"deepspeed": "train_args/deepspeed/zero2.json", "unlock_vision_at": 100},
         "unlock_vision_at is not supported with deepspeed"),
    ],
)  # fmt: skip
def test_gradient_caching_conflicts_are_refused(tmp_path, values, message):
    path = write_args(tmp_path / "a.json", output_dir="o", train_file="t.csv", image_path="i", **values)
    with pytest.raises(ArgumentError, match=message):
        parse_train_args(path)


def test_one_process_driving_several_gpus_is_refused():
    from component.training.run import check_one_process_per_gpu

    with pytest.raises(ArgumentError, match="torchrun --nproc_per_node 2"):
        check_one_process_per_gpu(types.SimpleNamespace(n_gpu=2))
    check_one_process_per_gpu(types.SimpleNamespace(n_gpu=1))


def test_cli_reports_argument_errors_without_traceback(tmp_path, capsys):
    path = write_args(tmp_path / "a.json", output_dir="o", image_path="i")
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(["--train_args_file", str(path)])
    assert exit_info.value.code == 2
    assert "error: " in (err := capsys.readouterr().err) and "train_file is required" in err


# --- data ------------------------------------------------------------------------------------


def test_string_column_round_trips_unicode():
    strings = ["左上角有一个红色的圆形", "", "a,b", "😀 emoji"]
    column = StringColumn(strings)
    assert column.tolist() == strings and len(column) == 4


def test_blank_text_rows_are_dropped_with_a_count(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(
        "text,url,filename\n一只猫,http://x/1.jpg,1.jpg\n  ,http://x/2.jpg,2.jpg\n,,3.jpg\n狗,,4.jpg\n"
    )
    rows = read_image_text_csv(path)
    assert rows.texts.tolist() == ["一只猫", "狗"] and rows.filenames.tolist() == ["1.jpg", "4.jpg"]
    assert rows.dropped_blank_text == 2


def test_csv_without_filename_column_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,url\n一只猫,http://x/1.jpg\n")
    with pytest.raises(ValueError, match=r"rows\.csv: missing column\(s\) \['filename'\]"):
        read_image_text_csv(path)


def test_bad_images_are_replaced_and_batch_keeps_its_size(shapes_data, tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("train-0.jpg", "train-1.jpg", "train-2.jpg"):
        (images / name).write_bytes((shapes_data / "images" / name).read_bytes())
    (images / "train-1.jpg").write_bytes(
        (shapes_data / "images" / "train-1.jpg").read_bytes()[:200]
    )  # truncated
    csv = tmp_path / "rows.csv"
    csv.write_text("text,filename\n一,train-0.jpg\n二,train-1.jpg\n三,train-2.jpg\n四,missing.jpg\n")
    processor = load_processor(tiny_checkpoint)
    transform = ImageTransform.from_processor(processor)
    dataset = ImageTextDataset(read_image_text_csv(csv), images, transform)
    samples = [dataset[i] for i in range(4)]
    assert [s["index"] for s in samples] == [0, dataset[1]["index"], 2, dataset[3]["index"]]
    assert samples[1]["index"] != 1 and samples[3]["index"] != 3
    assert dataset[1]["index"] == samples[1]["index"]  # the same replacement every time
    batch = ImageTextCollator(processor, transform, 16)(samples)
    assert batch["image_uint8"].shape == (4, 30, 30, 3) and batch["image_uint8"].dtype == torch.uint8
    assert batch["input_ids"].shape[0] == 4
    assert len(batch["bad_images"]) == 2 and "missing.jpg" in " ".join(batch["bad_images"])
    # the caption follows the replacement image, so every pair stays a true pair
    assert samples[1]["text"] == dataset.rows.texts[samples[1]["index"]]


def test_bad_image_tracker_stops_past_the_ceiling():
    tracker = BadImageTracker(max_fraction=0.1, min_samples=20)
    tracker.update(10, ["a", "b", "c"])  # 30 %, but too few samples yet to judge
    with pytest.raises(BadImageError, match=r"max_bad_image_fraction=0\.1"):
        tracker.update(10, [])


# --- locking -----------------------------------------------------------------------------------


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lit_locks_exactly_the_image_side(tiny_model):
    from component.training.arguments import TowerArguments

    apply_tower_locks(tiny_model, TowerArguments())
    names = trainable_names(tiny_model)
    assert not any(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert {n for n in (name for name, _ in tiny_model.named_parameters()) if n not in names} == {
        n for n, _ in tiny_model.named_parameters() if n.startswith(("vision_model.", "visual_projection."))
    }
    assert "logit_scale" in names and "text_projection.weight" in names

    apply_tower_locks(tiny_model, TowerArguments(freeze_vision_projection=False, freeze_text_model=True))
    names = trainable_names(tiny_model)
    assert names == {"visual_projection.weight", "text_projection.weight", "logit_scale"}


def test_unlock_reaches_the_optimizer(tiny_model):
    from component.training.arguments import TowerArguments

    apply_tower_locks(tiny_model, TowerArguments(unlock_vision_at="3"))
    groups = parameter_groups(tiny_model, 1e-3, 0.1, vision_learning_rate=2e-4, include_locked_vision=True)
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in tiny_model.vision_model.parameters())
    vision_groups = [g for g in groups if g["name"].startswith("vision")]
    assert {g["lr"] for g in vision_groups} == {2e-4}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(tiny_model.logit_scale) in no_decay
    assert id(tiny_model.text_model.embeddings.word_embeddings.weight) in no_decay
    assert id(tiny_model.text_projection.weight) not in no_decay
    unlock_vision_tower(tiny_model)
    assert all(p.requires_grad for p in tiny_model.vision_model.parameters())


# --- metrics -----------------------------------------------------------------------------------


def test_retrieval_metrics_by_hand_with_a_shared_image():
    # Two images; texts 0 and 1 describe image 0, text 2 describes image 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.1], [1.0, 0.3]]), dim=-1)
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]))
    # image 0: nearest text is 1 (correct) -> hit@1; image 1: nearest is text 0 (wrong), text 2 is 2nd
    assert metrics["i2t_recall@1"] == 0.5 and metrics["i2t_recall@5"] == 1.0
    # text 0 -> image 1 (wrong); text 1 -> image 0 (right); text 2 -> image 0 (wrong)
    assert metrics["t2i_recall@1"] == pytest.approx(1 / 3) and metrics["t2i_recall@5"] == 1.0
    assert metrics["mean_recall"] == pytest.approx((0.5 + 1 + 1 + 1 / 3 + 1 + 1) / 6)


def test_a_caption_of_several_images_is_one_text_that_each_of_them_matches():
    # Images 0 and 1 are red, image 2 green; text 0 is "red", text 1 "green".
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.0, 1.0]]), dim=-1)
    texts = torch.tensor([[1.0, 0.0], [0.1, 1.0]])
    metrics = retrieval_metrics(images, texts, [[0, 1], [2]])
    assert metrics["mean_recall"] == 1.0  # "red" finds a red image first, each image its colour
    # With image 1's "red" read as a text of image 0 alone, "red" would rank image 0 first: a miss.
    assert retrieval_metrics(images, texts, [[1], [2]])["t2i_recall@1"] == 0.5


class ClassNameSource:
    """A test source whose captions are class names: several images per caption."""

    def __init__(self, captions: list[str]):
        self.captions = captions

    def caption(self, index: int) -> str:
        return self.captions[index]

    def image_key(self, index: int) -> str:
        return f"image-{index}.jpg"


def test_test_rows_with_one_caption_count_as_one_text_whatever_their_order():
    # Rows of a class-name test set: every row of a caption has the same text embedding, so as rows
    # of their own they would tie and the sort's tie-break would decide which image is "right".
    captions = ["红色", "绿色", "红色", "红色", "绿色"]
    colour = {"红色": [1.0, 0.0], "绿色": [0.0, 1.0]}
    image_embeds = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.3], [1.0, 0.2], [0.1, 1.0]]), dim=-1
    )
    text_embeds = torch.tensor([colour[c] for c in captions])
    dataset = types.SimpleNamespace(source=ClassNameSource(captions))
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        index = torch.tensor(order)
        metrics = dataset_retrieval_metrics(dataset, image_embeds[index], text_embeds[index], index)
        assert metrics["mean_recall"] == 1.0 and (metrics["images"], metrics["texts"]) == (5, 2), order


# --- whole runs --------------------------------------------------------------------------------


def test_lit_training_run_saves_everything(tiny_towers, shapes_data, tmp_path):
    output = tmp_path / "run"
    args = write_args(tmp_path / "a.json", **tiny_run_args(tiny_towers, shapes_data, output))
    metrics = train_clip.main(["--train_args_file", str(args)])
    for name in ("model.safetensors", "config.json", "train_results.json", "eval_results.json"):
        assert (output / name).exists(), name
    evaluation = json.loads((output / "eval_results.json").read_text())
    for key in (
        "eval_loss",
        "eval_mean_recall",
        *(f"eval_{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
    ):
        assert 0 <= evaluation[key] <= (1 if "recall" in key else 100), key
    assert metrics["eval_mean_recall"] == evaluation["eval_mean_recall"]
    model = BertCLIPModel.from_pretrained(output)
    assert AutoProcessor.from_pretrained(output).tokenizer.tokenize("红色")[0] == "红"
    start = BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(tiny_towers["bert"]))
    for name, tensor in start.vision_model.state_dict().items():
        assert torch.equal(tensor, model.vision_model.state_dict()[name]), name  # LiT: locked
    assert torch.equal(start.visual_projection.weight, model.visual_projection.weight)
    assert not torch.equal(start.text_projection.weight, model.text_projection.weight)
    assert model.logit_scale.item() <= 4.6052


def test_evaluation_scores_every_test_row_even_with_drop_last(tiny_towers, shapes_data, tmp_path):
    # 20 test rows, eval batch 32: dropping the last batch would leave nothing to score
    metrics = {}
    for drop_last in (False, True):
        values = tiny_run_args(tiny_towers, shapes_data, tmp_path / str(drop_last), max_steps=2,
                               per_device_eval_batch_size=32, dataloader_drop_last=drop_last)  # fmt: skip
        metrics[drop_last] = run_training(
            *parse_train_args(write_args(tmp_path / f"{drop_last}.json", **values))
        )
    assert metrics[True]["eval_mean_recall"] == metrics[False]["eval_mean_recall"]
    assert metrics[True]["eval_loss"] == pytest.approx(metrics[False]["eval_loss"], rel=1e-6)


def test_unlock_at_step_trains_the_image_tower_afterwards(tiny_towers, shapes_data, tmp_path):
    output = tmp_path / "run"
    values = tiny_run_args(tiny_towers, shapes_data, output, unlock_vision_at=3, vision_learning_rate=1e-2)
    train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    model = BertCLIPModel.from_pretrained(output)
    start = BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(tiny_towers["bert"]))
    assert not torch.equal(start.vision_model.embeddings.patch_embedding.weight,
                           model.vision_model.embeddings.patch_embedding.weight)  # fmt: skip
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert {"step": 3, "vision_unlocked": "unlock_vision_at=3"} in history


def test_kill_and_rerun_ends_with_the_same_weights(tiny_towers, shapes_data, tmp_path):
    common = {"save_strategy": "steps", "save_steps": 2, "max_steps": 7, "unlock_vision_at": 3,
              "test_file": None}  # fmt: skip
    reference = tmp_path / "reference"
    train_clip.main(["--train_args_file", str(write_args(tmp_path / "r.json",
                     **tiny_run_args(tiny_towers, shapes_data, reference, **common)))])  # fmt: skip

    resumed = tmp_path / "resumed"
    args_path = write_args(tmp_path / "k.json", **tiny_run_args(tiny_towers, shapes_data, resumed, **common))
    process = multiprocessing.get_context("spawn").Process(target=run_until_killed, args=(args_path, 5))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL
    assert newest_complete_checkpoint(resumed).endswith("checkpoint-4")
    # a checkpoint torn by the kill: directory and some files, but never marked complete
    torn = resumed / "checkpoint-6"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    train_clip.main(["--train_args_file", str(args_path)])

    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_too_many_bad_images_stop_training(tiny_towers, shapes_data, tmp_path, capsys):
    csv = tmp_path / "train.csv"
    rows = (shapes_data / "train.csv").read_text().splitlines()
    csv.write_text("\n".join(rows[:20] + [f"坏图,,missing-{i}.jpg" for i in range(6)]) + "\n")
    values = tiny_run_args(tiny_towers, shapes_data, tmp_path / "run", train_file=str(csv), test_file=None)
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    assert exit_info.value.code == 1
    assert "max_bad_image_fraction=0.01" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_two_processes(arg_file: Path) -> None:
    """train_clip.py on `arg_file` in 2 processes under torchrun; fails the test with its stderr."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command = [*launcher, str(free_port()), str(REPO / "train_clip.py"), "--train_args_file", str(arg_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_gloo_training(tiny_towers, shapes_data, tmp_path):
    output = tmp_path / "ddp"
    values = tiny_run_args(tiny_towers, shapes_data, output, max_steps=3, ddp_backend="gloo")
    args = write_args(tmp_path / "a.json", **values)
    torchrun_two_processes(args)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((output / "eval_results.json").read_text())["eval_mean_recall"] > 0
    BertCLIPModel.from_pretrained(output)


def test_two_processes_share_the_feature_cache_work(tiny_towers, shapes_data, tmp_path):
    common = {"max_steps": 2, "cache_image_features": True}
    single = tmp_path / "single"
    train_clip.main(["--train_args_file", str(write_args(tmp_path / "s.json",
                     **tiny_run_args(tiny_towers, shapes_data, single, **common)))])  # fmt: skip
    output = tmp_path / "ddp"
    values = tiny_run_args(tiny_towers, shapes_data, output, ddp_backend="gloo", **common)
    args = write_args(tmp_path / "a.json", **values)
    torchrun_two_processes(args)
    cache, reference = output / "image_feature_cache", single / "image_feature_cache"
    assert not list(cache.glob("*.part-*"))
    names = sorted(path.name for path in reference.glob("*.npy"))
    assert names == sorted(path.name for path in cache.glob("*.npy")) and len(names) == 4  # train, test
    for name in names:
        np.testing.assert_allclose(np.load(cache / name), np.load(reference / name), atol=1e-3, rtol=1e-3)


def test_plateau_unlock_waits_for_patience(tiny_model):
    from transformers import TrainerState

    from component.training.arguments import TowerArguments
    from component.training.trainer import VisionUnlockCallback

    apply_tower_locks(tiny_model, TowerArguments(unlock_vision_at="plateau"))
    callback = VisionUnlockCallback(plateau_patience=2)
    state = TrainerState()
    for step, recall in [(10, 0.2), (20, 0.3), (30, 0.29)]:  # best 0.3, then one evaluation without gain
        state.global_step = step
        callback.on_evaluate(None, state, None, metrics={"eval_mean_recall": recall}, model=tiny_model)
        assert not tiny_model.vision_model.embeddings.patch_embedding.weight.requires_grad, step
    state.global_step = 40
    callback.on_evaluate(
        None, state, None, metrics={"eval_mean_recall": 0.3}, model=tiny_model
    )  # equal: no gain
    assert all(p.requires_grad for p in tiny_model.vision_model.parameters())
    assert callback.unlocked_at == 40 and state.log_history[-1]["step"] == 40
    # a resumed run restores the unlocked tower from the checkpoint's trainer state
    apply_tower_locks(tiny_model, TowerArguments(unlock_vision_at="plateau"))
    state.stateful_callbacks = {"VisionUnlockCallback": callback.state()}
    restored = VisionUnlockCallback(plateau_patience=2)
    restored.on_train_begin(None, state, None, model=tiny_model)
    assert restored.unlocked_at == 40
    assert all(p.requires_grad for p in tiny_model.vision_model.parameters())


def test_logit_scale_is_clamped_after_each_step(tiny_model):
    from component.training.trainer import LogitScaleClampCallback

    with torch.no_grad():
        tiny_model.logit_scale.fill_(5.0)
    LogitScaleClampCallback().on_step_end(None, None, None, model=tiny_model)
    assert tiny_model.logit_scale.item() == pytest.approx(4.60517, abs=1e-5)


def test_wrong_image_path_stops_with_a_message(tiny_towers, shapes_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # exists (a missing one is refused at parse time) but holds no images
    values = tiny_run_args(tiny_towers, shapes_data, tmp_path / "run", image_path=str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    assert exit_info.value.code == 1
    assert "images in a row failed to load; is image_path right?" in capsys.readouterr().err
