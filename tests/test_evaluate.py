"""evaluate.py end to end on a tiny model: Chinese-CLIP's protocol against cn_clip's own evaluation
scripts on the same features, the toolkit's recall, zero-shot accuracy by hand, and bad input."""

import base64
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _runs import tiny_run_args, write_args
from PIL import Image, ImageDraw
from test_cn_clip_data import build_lmdb_with_cn_clip

import evaluate
import train_clip
from component.encoding import encode_images, encode_texts, load_model_and_processor
from component.evaluation.metrics import retrieval_metrics
from component.evaluation.zeroshot import read_templates
from component.testing.demo import COLORS

needs_cn_clip = pytest.mark.skipif(
    importlib.util.find_spec("cn_clip") is None, reason="needs cn_clip: pip install --no-deps cn_clip six"
)
needs_lmdb = pytest.mark.skipif(importlib.util.find_spec("lmdb") is None, reason="needs lmdb")
TOLERANCE = 1e-4
N_IMAGES = 12  # cn_clip's scorer wants 10 distinct predictions per query, so 10 or more of each
# 11 texts: text 101 has two images, image 1 two texts, image 11 none (a candidate only).
TEXT_IMAGES = {
    100: [0],
    101: [1, 2],
    102: [1],
    103: [3],
    104: [4],
    105: [5],
    106: [6],
    107: [7],
    108: [8],
    109: [9],
    110: [10],
}
WORDS = "红绿蓝黄紫黑白灰橙粉青"


def draw(number: int) -> bytes:
    image = Image.new("RGB", (30, 30), (number * 20 % 256, 255 - number * 15, number * 37 % 256))
    ImageDraw.Draw(image).rectangle((number, number, number + 10, 25), fill=(number * 50 % 256, 0, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def muge_split(tmp_path_factory) -> Path:
    """A MUGE-style split: valid_imgs.tsv (URL-safe base64, as cn_clip writes it) and valid_texts.jsonl."""
    directory = tmp_path_factory.mktemp("muge")
    with open(directory / "valid_imgs.tsv", "w") as file:
        for number in range(N_IMAGES):
            file.write(f"{number}\t{base64.urlsafe_b64encode(draw(number)).decode()}\n")
    with open(directory / "valid_texts.jsonl", "w", encoding="utf-8") as file:
        for text_id, images in TEXT_IMAGES.items():
            text = f"一张{WORDS[text_id - 100]}色的图片"
            file.write(
                json.dumps({"text_id": text_id, "text": text, "image_ids": images}, ensure_ascii=False) + "\n"
            )
    return directory / "valid_texts.jsonl"


@pytest.fixture(scope="module")
def features(tiny_checkpoint, muge_split):
    """The reference features: every text and every image of the split, encoded directly."""
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    lines = [json.loads(line) for line in muge_split.read_text(encoding="utf-8").splitlines()]
    text_embeds = encode_texts(model, processor, [line["text"] for line in lines], max_length=64)
    images = [Image.open(io.BytesIO(draw(number))).convert("RGB") for number in range(N_IMAGES)]
    return text_embeds, encode_images(model, processor, images)


@pytest.fixture
def model_arg(tiny_checkpoint) -> list[str]:
    return ["--model_name_or_path", str(tiny_checkpoint)]


def run_evaluate(argv, tmp_path) -> dict:
    output = tmp_path / "metrics.json"
    printed = evaluate.main([*argv, "--device", "cpu", "--no_progress", "--json", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(printed))
    return printed


def cn_clip_scores(text_embeds, image_embeds, directory: Path) -> dict[str, float]:
    """Chinese-CLIP's numbers as its scripts compute them: top-10 predictions written as
    make_topk_predictions(_tr).py writes them, scored by evaluation.py and evaluation_tr.py."""
    from cn_clip.eval import evaluation, evaluation_tr

    similarity = (text_embeds @ image_embeds.T).tolist()
    text_ids = list(TEXT_IMAGES)
    with open(directory / "t2i_pred.jsonl", "w") as file:
        for row, text_id in enumerate(text_ids):
            ranked = sorted(
                zip(range(N_IMAGES), similarity[row], strict=True), key=lambda x: x[1], reverse=True
            )[:10]
            file.write(json.dumps({"text_id": text_id, "image_ids": [image for image, _ in ranked]}) + "\n")
    image_texts = {}
    for text_id, images in TEXT_IMAGES.items():
        for image in images:
            image_texts.setdefault(image, []).append(text_id)
    with open(directory / "i2t_gold.jsonl", "w") as gold, open(directory / "i2t_pred.jsonl", "w") as pred:
        for image, texts in image_texts.items():
            gold.write(json.dumps({"image_id": image, "text_ids": texts}) + "\n")
            scores = [(text_id, similarity[row][image]) for row, text_id in enumerate(text_ids)]
            ranked = sorted(scores, key=lambda x: x[1], reverse=True)[:10]
            pred.write(json.dumps({"image_id": image, "text_ids": [text for text, _ in ranked]}) + "\n")
    gold_path = directory / "t2i_gold.jsonl"
    gold_path.write_text(
        "".join(json.dumps({"text_id": t, "image_ids": i}) + "\n" for t, i in TEXT_IMAGES.items())
    )
    t2i = evaluation.compute_score(str(gold_path), str(directory / "t2i_pred.jsonl"))
    i2t = evaluation_tr.compute_score(str(directory / "i2t_gold.jsonl"), str(directory / "i2t_pred.jsonl"))
    return {
        "t2i_mean_recall": t2i[0],
        "t2i_r1": t2i[1],
        "t2i_r5": t2i[2],
        "t2i_r10": t2i[3],
        "i2t_mean_recall": i2t[0],
        "i2t_r1": i2t[1],
        "i2t_r5": i2t[2],
        "i2t_r10": i2t[3],
    }


@needs_cn_clip
def test_cn_clip_protocol_equals_cn_clip_evaluation_scripts(model_arg, muge_split, features, tmp_path):
    results = run_evaluate([*model_arg, "--test_file", str(muge_split)], tmp_path)
    expected = cn_clip_scores(*features, tmp_path)
    for name, value in expected.items():
        assert results["cn_clip"][name] == pytest.approx(value, abs=TOLERANCE), name
    six = [expected[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert results["cn_clip"]["mean_recall"] == pytest.approx(sum(six) / 6, abs=TOLERANCE)
    assert results["data"] == {"test_file": str(muge_split), "pairs": 12, "texts": 11, "images": 12}


def test_toolkit_recall_counts_each_text_and_each_image_once(model_arg, muge_split, features, tmp_path):
    results = run_evaluate([*model_arg, "--test_file", str(muge_split)], tmp_path)
    text_embeds, image_embeds = features
    pair_images = [image for images in TEXT_IMAGES.values() for image in images]
    used = list(dict.fromkeys(pair_images))  # 11 images have a text; image 11 is not scored here
    text_to_images = [[used.index(image) for image in images] for images in TEXT_IMAGES.values()]
    expected = retrieval_metrics(image_embeds[used], text_embeds, text_to_images)
    assert results["toolkit"] == pytest.approx(expected, abs=TOLERANCE)


@needs_lmdb
@needs_cn_clip
def test_lmdb_built_by_cn_clip_evaluates_as_its_tsv_jsonl(model_arg, muge_split, tmp_path):
    shutil.copytree(muge_split.parent, tmp_path / "data")
    lmdb_dir = build_lmdb_with_cn_clip(tmp_path / "data")
    from_tsv = run_evaluate([*model_arg, "--test_file", str(muge_split)], tmp_path)
    from_lmdb = run_evaluate([*model_arg, "--test_file", str(lmdb_dir)], tmp_path)
    assert from_lmdb["cn_clip"] == pytest.approx(from_tsv["cn_clip"], abs=TOLERANCE)
    assert from_lmdb["toolkit"] == pytest.approx(from_tsv["toolkit"], abs=TOLERANCE)


def test_trained_model_directory_evaluates_with_no_other_flags(
    model_arg, tiny_checkpoint, muge_split, tmp_path
):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "run")
    record = {"data": {"test_file": str(muge_split), "image_path": None, "max_seq_length": 64}}
    (model_dir / "toolkit_args.json").write_text(json.dumps(record))
    own = run_evaluate(["--model_name_or_path", str(model_dir)], tmp_path)
    given = run_evaluate([*model_arg, "--test_file", str(muge_split)], tmp_path)
    assert own["cn_clip"] == given["cn_clip"] and own["toolkit"] == given["toolkit"]


def test_class_name_captions_give_training_s_recall_with_each_caption_once(tiny_towers, shapes, tmp_path):
    # The test rows' captions cut down to their colour: 16 rows, 6 captions shared by 2-3 images.
    rows = (shapes / "test.csv").read_text(encoding="utf-8").splitlines()[1:]
    colours = [next(c for c in COLORS if c in row) for row in rows]
    test_csv = tmp_path / "colours.csv"
    lines = [f"{colour},,{row.split(',')[-1]}\n" for colour, row in zip(colours, rows, strict=True)]
    test_csv.write_text("text,url,filename\n" + "".join(lines), encoding="utf-8")
    values = tiny_run_args(tiny_towers, shapes, tmp_path / "run", test_file=str(test_csv), max_steps=4)
    trained = train_clip.main(["--train_args_file", str(write_args(tmp_path / "a.json", **values))])
    results = run_evaluate(["--model_name_or_path", str(tmp_path / "run")], tmp_path)
    assert trained["eval_texts"] == len(set(colours)) and trained["eval_images"] == len(rows)
    training = {name.removeprefix("eval_"): value for name, value in trained.items() if "recall" in name}
    assert results["toolkit"] == pytest.approx(training, abs=1e-6)
    # Chinese-CLIP's protocol groups texts alike here (a CSV's text key is its caption).
    assert results["cn_clip"]["i2t_r1"] == pytest.approx(100 * training["i2t_recall@1"], abs=TOLERANCE)
    assert results["cn_clip"]["t2i_r1"] == pytest.approx(100 * training["t2i_recall@1"], abs=TOLERANCE)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """Three class subfolders (names sort as the labels' order) of two images each."""
    root = tmp_path_factory.mktemp("zeroshot")
    for number in range(6):
        folder = root / "images" / f"class{number // 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number}.png").write_bytes(draw(number * 2))
    (root / "labels.txt").write_text("红色\n绿色\n蓝色\n", encoding="utf-8")
    (root / "templates.txt").write_text("一张{}的照片\n{}的图\n", encoding="utf-8")
    return root


def hand_zeroshot(checkpoint, images: list[Path], targets: list[int], labels, templates) -> dict[str, float]:
    model, processor = load_model_and_processor(checkpoint, "cpu")
    classes = []
    for label in labels:
        prompts = encode_texts(model, processor, [t.replace("{}", label) for t in templates], max_length=64)
        classes.append(F.normalize(prompts.mean(dim=0), dim=0))
    image_embeds = encode_images(model, processor, images)
    correct1 = correct5 = 0
    for embed, target in zip(image_embeds, targets, strict=True):
        scores = [float(embed @ weights) for weights in classes]
        ranked = sorted(range(len(labels)), key=lambda c: -scores[c])
        correct1 += ranked[0] == target
        correct5 += target in ranked[:5]
    return {"zeroshot_top1": 100 * correct1 / len(images), "zeroshot_top5": 100 * correct5 / len(images)}


def test_zeroshot_accuracy_on_a_class_folder_equals_a_hand_computation(
    model_arg, tiny_checkpoint, class_folder, tmp_path
):
    results = run_evaluate(
        [
            *model_arg,
            "--zeroshot_labels",
            str(class_folder / "labels.txt"),
            "--zeroshot_images",
            str(class_folder / "images"),
            "--templates",
            str(class_folder / "templates.txt"),
        ],
        tmp_path,
    )
    images = sorted((class_folder / "images").rglob("*.png"))
    targets = [int(path.parent.name[-1]) for path in images]
    expected = hand_zeroshot(
        tiny_checkpoint, images, targets, ["红色", "绿色", "蓝色"], ["一张{}的照片", "{}的图"]
    )
    assert set(results) == {"zeroshot"}
    assert results["zeroshot"]["zeroshot_top1"] == pytest.approx(expected["zeroshot_top1"])
    assert results["zeroshot"]["zeroshot_top5"] == 100.0
    assert results["zeroshot"]["zeroshot_images"] == 6 and results["zeroshot"]["zeroshot_templates"] == 2


def test_zeroshot_csv_of_labelled_images_gives_the_folder_numbers(tiny_checkpoint, class_folder, tmp_path):
    rows = ["filename,label"] + [
        f"class{n // 2}/{n}.png,{['红色', '绿色', '蓝色'][n // 2]}" for n in range(6)
    ]
    (tmp_path / "labelled.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = [
        "--model_name_or_path",
        str(tiny_checkpoint),
        "--zeroshot_labels",
        str(class_folder / "labels.txt"),
    ]
    from_csv = run_evaluate(
        [
            *common,
            "--zeroshot_images",
            str(tmp_path / "labelled.csv"),
            "--image_path",
            str(class_folder / "images"),
        ],
        tmp_path,
    )
    from_folder = run_evaluate([*common, "--zeroshot_images", str(class_folder / "images")], tmp_path)
    assert from_csv == from_folder


@needs_cn_clip
def test_cn_clip_templates_are_read_from_the_installed_package():
    from cn_clip.eval.cvinw_zeroshot_templates import openai_templates

    templates = read_templates("cn_clip")
    assert templates == [template("{}") for template in openai_templates]
    assert templates[0] == "{}的照片" and len(templates) == len(openai_templates)


def expect_one_line_error(argv, capsys, pattern: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([*argv, "--device", "cpu", "--no_progress"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    assert re.search(pattern, error), error


def test_model_without_toolkit_args_needs_a_test_file(model_arg, capsys):
    expect_one_line_error(model_arg, capsys, r"no --test_file given")


def test_unknown_kind_of_test_data_is_refused(model_arg, tmp_path, capsys):
    (tmp_path / "test.txt").write_text("x")
    expect_one_line_error(
        [*model_arg, "--test_file", str(tmp_path / "test.txt")], capsys, r"unknown kind of data"
    )


def test_csv_without_image_path_is_refused(model_arg, tmp_path, capsys):
    (tmp_path / "test.csv").write_text("text,filename\n猫,a.jpg\n", encoding="utf-8")
    expect_one_line_error(
        [*model_arg, "--test_file", str(tmp_path / "test.csv")], capsys, r"needs image_path"
    )


def test_broken_base64_in_the_test_tsv_names_its_line(tiny_checkpoint, muge_split, tmp_path, capsys):
    shutil.copytree(muge_split.parent, tmp_path / "data")
    images = tmp_path / "data" / "valid_imgs.tsv"
    lines = images.read_text().splitlines(keepends=True)
    lines[4] = "4\t@@@@\n"
    images.write_text("".join(lines))
    argv = [
        "--model_name_or_path",
        str(tiny_checkpoint),
        "--test_file",
        str(tmp_path / "data" / "valid_texts.jsonl"),
    ]
    expect_one_line_error(argv, capsys, r"valid_imgs\.tsv, line 5: the image is not valid base64")


def test_zeroshot_label_count_must_match_the_class_folders(model_arg, class_folder, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("红色\n绿色\n", encoding="utf-8")
    argv = [
        *model_arg,
        "--zeroshot_labels",
        str(tmp_path / "labels.txt"),
        "--zeroshot_images",
        str(class_folder / "images"),
    ]
    expect_one_line_error(argv, capsys, r"3 class subfolders but 2 labels")


def test_csv_test_file_gives_the_recall_of_its_image_files(model_arg, tiny_checkpoint, shapes, tmp_path):
    results = run_evaluate(
        [*model_arg, "--test_file", str(shapes / "test.csv"), "--image_path", str(shapes / "images")],
        tmp_path,
    )
    model, processor = load_model_and_processor(tiny_checkpoint, "cpu")
    rows = [line.split(",") for line in (shapes / "test.csv").read_text(encoding="utf-8").splitlines()[1:]]
    text_embeds = encode_texts(model, processor, [text for text, _, _ in rows], max_length=64)
    image_embeds = encode_images(model, processor, [shapes / "images" / name for _, _, name in rows])
    expected = retrieval_metrics(image_embeds, text_embeds, torch.arange(len(rows)))
    assert results["toolkit"] == pytest.approx(expected, abs=TOLERANCE)
    assert results["data"]["pairs"] == results["data"]["images"] == len(rows) == 16


def test_webdataset_shards_evaluate_as_the_csv_they_were_written_from(model_arg, shapes, tmp_path):
    from _shards import write_img2dataset_shards

    write_img2dataset_shards(shapes / "test.csv", shapes / "images", tmp_path / "shards", shard_size=10)
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    from_shards = run_evaluate([*model_arg, "--test_file", pattern], tmp_path)
    from_csv = run_evaluate(
        [*model_arg, "--test_file", str(shapes / "test.csv"), "--image_path", str(shapes / "images")],
        tmp_path,
    )
    assert from_shards["toolkit"] == pytest.approx(from_csv["toolkit"], abs=TOLERANCE)
    assert from_shards["cn_clip"] == pytest.approx(from_csv["cn_clip"], abs=TOLERANCE)
    assert from_shards["data"]["pairs"] == from_shards["data"]["images"] == 16
