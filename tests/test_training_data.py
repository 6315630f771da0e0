"""Training data and evaluation defects: bad test images, the bad-image ceiling in short runs,
names that escape image_path, FIFOs, and data sizes that crash a run or train nothing."""

import logging
import os
import threading
import types
from pathlib import Path

import pytest
import torch
from _runs import tiny_run_args, write_args

import train_clip
from component.evaluation.metrics import trivial_recall_note
from component.loss import contrastive_loss
from component.processor import ImageTransform, load_processor
from component.training.arguments import ArgumentError
from component.training.dataset import DataError, ImageTextDataset, read_image_text_csv
from component.training.run_checks import (
    avoid_lone_last_batch,
    check_data_sizes,
    check_drop_last_fits,
    check_max_seq_length,
)
from component.training.trainer import BadImageError, BadImageTracker


def csv_with_missing_images(shapes: Path, split: str, good: int, missing: int, path: Path) -> Path:
    """The first `good` rows of the shapes split plus `missing` rows whose image does not exist."""
    rows = (shapes / f"{split}.csv").read_text().splitlines()
    path.write_text("\n".join(rows[: good + 1] + [f"坏图,,missing-{i}.jpg" for i in range(missing)]) + "\n")
    return path


def run_main(tmp_path: Path, values: dict) -> dict:
    return train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])


# --- C. bad images in the test set ---------------------------------------------------------------


def test_bad_test_images_are_counted_and_left_out_of_recall(tiny_towers, shapes, tmp_path, caplog):
    test_csv = csv_with_missing_images(shapes, "test", 16, 2, tmp_path / "test.csv")
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", test_file=str(test_csv), max_steps=1,
                           max_bad_image_fraction=0.2)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        metrics = run_main(tmp_path, values)
    assert metrics["eval_bad_images"] == 2
    assert metrics["eval_images"] == 16  # the two replacements are not scored a second time
    assert f"{test_csv}: 2 of 18 test images failed to load" in caplog.text
    assert "missing-0.jpg" in caplog.text


def test_too_many_bad_test_images_stop_the_run_naming_the_test_file(tiny_towers, shapes, tmp_path, capsys):
    test_csv = csv_with_missing_images(shapes, "test", 16, 2, tmp_path / "test.csv")
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", test_file=str(test_csv), max_steps=1)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, values)
    assert exit_info.value.code == 1
    assert f"{test_csv}: 2 of 18 images failed to load" in (err := capsys.readouterr().err)
    assert "max_bad_image_fraction=0.01" in err


# --- 5. the ceiling in a run shorter than min_samples --------------------------------------------


def test_short_run_with_bad_images_stops_at_the_end(tiny_towers, shapes, tmp_path, capsys):
    # 20 rows, half missing: 2 steps of 8 see 16 samples, fewer than the 20 the mid-run check waits for
    train_csv = csv_with_missing_images(shapes, "train", 10, 10, tmp_path / "train.csv")
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", train_file=str(train_csv), test_file=None,
                           max_steps=2)  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, values)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {train_csv}: " in err and "of 16 images failed to load" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_tracker_final_check_judges_a_short_run():
    tracker = BadImageTracker(max_fraction=0.1, min_samples=1000, source="train.csv")
    tracker.update(8, ["a.jpg: missing"])  # 12.5 %, far fewer samples than min_samples
    with pytest.raises(BadImageError, match=r"train\.csv: 1 of 8 images failed to load \(12\.5%\)"):
        tracker.check()
    BadImageTracker(max_fraction=0.2, min_samples=1000).check(1, 8)  # under the ceiling: no error


# --- 10 and 11. names outside image_path, files that are not regular files ----------------------


@pytest.fixture
def image_dir(shapes, tmp_path) -> Path:
    """images/ with one good image, and a good image outside it (outside.jpg)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes((shapes / "images" / "train-0.jpg").read_bytes())
    (tmp_path / "outside.jpg").write_bytes((shapes / "images" / "train-1.jpg").read_bytes())
    return images


def dataset_of(filenames: list[str], images: Path, tiny_checkpoint: Path) -> ImageTextDataset:
    csv = images.parent / "rows.csv"
    csv.write_text("text,filename\n" + "".join(f"图{i},{name}\n" for i, name in enumerate(filenames)))
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    return ImageTextDataset(read_image_text_csv(csv), images, transform)


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlink", "symlinked-directory"])
def test_names_escaping_image_path_are_bad_images(image_dir, tiny_checkpoint, kind):
    outside = image_dir.parent / "outside.jpg"
    if kind == "symlink":
        (image_dir / "link.jpg").symlink_to(outside)
    if kind == "symlinked-directory":
        (image_dir / "sub").symlink_to(image_dir.parent)
    name = {"absolute": str(outside), "dot-dot": "../outside.jpg", "symlink": "link.jpg",
            "symlinked-directory": "sub/outside.jpg"}[kind]  # fmt: skip
    dataset = dataset_of(["good.jpg", name], image_dir, tiny_checkpoint)
    sample = dataset[1]
    assert sample["index"] == 0  # replaced by the good row
    assert sample["bad_images"] == [f"{name}: unsafe_filename: path escapes image_path"]


def test_symlink_inside_image_path_is_still_read(image_dir, tiny_checkpoint):
    (image_dir / "alias.jpg").symlink_to(image_dir / "good.jpg")
    dataset = dataset_of(["good.jpg", "alias.jpg"], image_dir, tiny_checkpoint)
    assert dataset[1]["index"] == 1 and dataset[1]["bad_images"] == []


def test_fifo_named_as_an_image_is_replaced_without_blocking(image_dir, tiny_checkpoint):
    fifo = image_dir / "fifo.jpg"
    os.mkfifo(fifo)
    (image_dir / "folder.jpg").mkdir()
    dataset = dataset_of(["good.jpg", "fifo.jpg", "folder.jpg"], image_dir, tiny_checkpoint)
    samples = {}
    worker = threading.Thread(target=lambda: samples.update({1: dataset[1], 2: dataset[2]}), daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # the old code blocks in open(); a writer's open and close releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO named as an image blocked")
    for row in (1, 2):
        assert samples[row]["index"] == 0
        assert samples[row]["bad_images"][0].startswith(f"{dataset.rows.filenames[row]}: not_a_file")


# --- 12, 7 and 19. data sizes that crash a run or train nothing -----------------------------------


def training_args(batch: int, drop_last: bool, world_size: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(per_device_train_batch_size=batch, dataloader_drop_last=drop_last,
                                 world_size=world_size)  # fmt: skip


def test_drop_last_with_a_batch_larger_than_the_training_set_is_refused():
    message = (r"dataloader_drop_last with per_device_train_batch_size 64 needs at least 64 training "
               r"rows, but train\.csv has 20; lower per_device_train_batch_size to at most 20 or set "
               r"dataloader_drop_last to false")  # fmt: skip
    with pytest.raises(ArgumentError, match=message):
        check_drop_last_fits(20, "train.csv", training_args(64, drop_last=True))
    with pytest.raises(ArgumentError, match="on each of 4 processes needs at least 32"):
        check_drop_last_fits(20, "train.csv", training_args(8, drop_last=True, world_size=4))
    check_drop_last_fits(20, "train.csv", training_args(64, drop_last=False))
    check_drop_last_fits(20, "train.csv", training_args(20, drop_last=True))


def test_max_seq_length_beyond_the_position_embeddings_is_refused(tiny_model):
    positions = tiny_model.config.text_config.max_position_embeddings
    message = (
        f"max_seq_length {positions + 1} is more than the text tower's max_position_embeddings {positions}"
    )
    with pytest.raises(ArgumentError, match=message):
        check_max_seq_length(positions + 1, tiny_model.config)
    check_max_seq_length(positions, tiny_model.config)
    # the crash it prevents: a caption that long has no position embedding
    with pytest.raises((IndexError, RuntimeError)):
        tiny_model.get_text_features(input_ids=torch.ones(1, positions + 1, dtype=torch.long))


def test_lone_last_batch_is_dropped_with_a_warning(caplog):
    assert contrastive_loss(torch.ones(1, 4) / 2, torch.ones(1, 4) / 2, torch.tensor(2.0)).item() == 0
    args = training_args(8, drop_last=False)
    with caplog.at_level(logging.WARNING):
        avoid_lone_last_batch(17, "train.csv", args)
    assert args.dataloader_drop_last is True
    assert "train.csv has 17 rows and per_device_train_batch_size is 8" in caplog.text
    for rows, world_size in ((16, 1), (18, 1), (17, 2)):  # a full last batch, 2 rows, or global negatives
        args = training_args(8, drop_last=False, world_size=world_size)
        avoid_lone_last_batch(rows, "train.csv", args)
        assert args.dataloader_drop_last is False, (rows, world_size)


def test_a_single_training_row_is_refused():
    with pytest.raises(
        DataError, match=r"train\.csv has 1 usable row; contrastive training needs at least 2"
    ):
        avoid_lone_last_batch(1, "train.csv", training_args(8, drop_last=False))


def test_data_size_checks_run_on_the_built_dataset(image_dir, tiny_checkpoint):
    dataset = dataset_of(["good.jpg"] * 9, image_dir, tiny_checkpoint)
    with pytest.raises(ArgumentError, match=r"rows\.csv has 9; lower"):
        check_data_sizes(dataset, training_args(64, drop_last=True))
    args = training_args(8, drop_last=False)
    check_data_sizes(dataset, args)
    assert args.dataloader_drop_last is True


def test_recall_over_one_test_image_is_flagged_as_meaningless():
    assert "every recall is 1.0 whatever the model" in trivial_recall_note(1, 1)
    assert "t2i_recall@5, t2i_recall@10, i2t_recall@10 are 1.0" in trivial_recall_note(4, 6)
    assert "6 captions to score: i2t_recall@10 is 1.0 whatever" in trivial_recall_note(120, 6)
    assert trivial_recall_note(11, 11) is None


def test_one_row_test_set_warns_in_the_log(tiny_towers, shapes, tmp_path, caplog):
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("\n".join((shapes / "test.csv").read_text().splitlines()[:2]) + "\n")
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", test_file=str(test_csv), max_steps=1)
    with caplog.at_level(logging.WARNING):
        metrics = run_main(tmp_path, values)
    assert metrics["eval_mean_recall"] == 1.0 and metrics["eval_images"] == 1
    assert f"{test_csv}: only 1 image and 1 caption(s) to score" in caplog.text


# --- 12 and 7 through train_clip.py: refused before training, after the data is read -------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"dataloader_drop_last": True, "per_device_train_batch_size": 64},
            "needs at least 64 training rows",
        ),
        ({"max_seq_length": 200}, "max_position_embeddings 128"),
    ],
)
def test_run_checks_stop_train_clip_with_one_line(tiny_towers, shapes, tmp_path, capsys, overrides, message):
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", **overrides)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, values)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
