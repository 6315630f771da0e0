"""Reading the arg file and command-line overrides: old key names, value types, encodings, paths,
logging packages and run lengths, each refused in one line (exit 2) before any model loads."""

import json
import logging
import types
from pathlib import Path

import pytest

import train_clip
from component.model import BertCLIPModel
from component.training import arg_checks
from component.training.arg_values import ArgumentError, convert_text
from component.training.arguments import command_line_overrides, field_annotations, parse_train_args

# train_args/train_clip.json of the original CLIP-Chinese project (transformers 4.x), paths as shipped
ORIGINAL_CLIP_CHINESE = """{
    "output_dir": "output/clip",
    "clip_pretrain_path": "openai/clip-vit-base-patch32",
    "bert_pretrain_path": "Langboat/mengzi-bert-base",
    "load_from_bert_clip": false,
    "image_path": "./data/images",
    "train_file": "./data/train.csv",
    "test_file": "./data/eval.csv",
    "num_train_epochs": 50,
    "max_steps": -1,
    "per_device_train_batch_size": 768,
    "per_device_eval_batch_size": 256,
    "learning_rate": 4e-5,
    "max_seq_length": 100,
    "logging_steps": 500,
    "save_steps": 1000,
    "save_total_limit": 5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 3000,
    "warmup_ratio": 0,

    "gradient_accumulation_steps": 1,
    "optim": "adamw_torch",
    "seed": 42,
    "fp16": true,
    "no_cuda": false,
    "dataloader_num_workers": 30,
    "save_strategy": "steps",
    "weight_decay": 0,
    "max_grad_norm": 1.0
}
"""


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """The current directory, with data/train.csv, data/eval.csv and data/images/ as CLIP-Chinese has."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    for name in ("train.csv", "eval.csv"):
        (tmp_path / "data" / name).write_text("text,filename\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every check here must come before a model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(BertCLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(BertCLIPModel, "from_vision_text_pretrained", refuse)


def base_values(**values) -> dict:
    return {"output_dir": "out", "train_file": "data/train.csv", "image_path": "data/images", **values}


def write_json(path: Path, values) -> Path:
    path.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")
    return path


def refusal(capsys, *argv: str) -> str:
    """train_clip.main's one-line error for `argv`, checking exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- item 2: transformers 4.x key names ------------------------------------------------------


def test_original_clip_chinese_file_parses_as_it_is(data_dir, caplog):
    (data_dir / "train_clip.json").write_text(ORIGINAL_CLIP_CHINESE, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        _, data_args, _, training_args = parse_train_args(data_dir / "train_clip.json")
    assert training_args.use_cpu is False and training_args.warmup_steps == 3000  # ratio 0 means unset
    assert data_args.test_file == "./data/eval.csv"
    assert "no_cuda is the transformers 4.x name of use_cpu" in caplog.text


def test_old_keys_are_read_under_their_new_names(data_dir, caplog):
    old = {
        "no_cuda": True,
        "warmup_ratio": 0.1,
        "warmup_steps": 0,  # transformers 4.x default: the ratio applies
        "evaluation_strategy": "epoch",
        "per_gpu_train_batch_size": 4,
    }
    with caplog.at_level(logging.WARNING):
        _, _, _, training_args = parse_train_args(write_json(data_dir / "a.json", base_values(**old)))
    assert training_args.use_cpu is True and training_args.warmup_steps == 0.1
    assert training_args.eval_strategy == "epoch" and training_args.per_device_train_batch_size == 4
    for new in ("use_cpu", "warmup_steps", "eval_strategy", "per_device_train_batch_size"):
        assert f"name of {new}" in caplog.text


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"no_cuda": True, "use_cpu": False}, "no_cuda true and use_cpu false disagree"),
        ({"warmup_ratio": 0.1, "warmup_steps": 100}, "warmup_ratio 0.1 and warmup_steps 100 disagree"),
        ({"evaluation_strategy": "steps", "eval_strategy": "epoch"}, 'evaluation_strategy "steps"'),
        ({"warmup_ratio": 1.5}, "warmup_ratio must be a number in [0, 1), got 1.5"),
    ],
)
def test_old_and_new_names_that_disagree_are_refused(data_dir, capsys, values, named):
    path = write_json(data_dir / "a.json", base_values(**values))
    assert named in refusal(capsys, "--train_args_file", str(path))


# --- item 6: value types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("learning_rate", "1e-3", "a number"),
        ("learning_rate", "abc", "a number"),
        ("learning_rate", None, "a number"),
        ("num_train_epochs", "1", "a number"),
        ("per_device_train_batch_size", "8", "an integer"),
        ("seed", 1.5, "an integer"),
        ("max_seq_length", "16", "an integer"),
        ("freeze_vision_model", "false", "true or false"),
        ("seed", True, "an integer"),
        ("report_to", ["tensorboard", 1], "a list of a string"),
    ],
)
def test_wrong_value_type_is_one_line_naming_key_value_and_type(data_dir, capsys, key, value, expected):
    path = write_json(data_dir / "a.json", base_values(**{key: value}))
    err = refusal(capsys, "--train_args_file", str(path))
    assert f"{key} must be {expected}" in err and f"got {json.dumps(value)}" in err


def test_ints_for_floats_and_null_for_optional_fields_are_accepted(data_dir):
    values = base_values(learning_rate=1, test_file=None, vision_learning_rate=None, max_steps=1e1)
    _, data_args, tower_args, training_args = parse_train_args(write_json(data_dir / "a.json", values))
    assert training_args.learning_rate == 1 and training_args.max_steps == 10
    assert data_args.test_file is None and tower_args.vision_learning_rate is None


# --- item 8: encoding and JSON -----------------------------------------------------------------


def test_gbk_arg_file_names_the_expected_encoding(data_dir, capsys):
    path = data_dir / "gbk.json"
    path.write_bytes(json.dumps(base_values(output_dir="输出"), ensure_ascii=False).encode("gbk"))
    err = refusal(capsys, "--train_args_file", str(path))
    assert "gbk.json: not UTF-8" in err and "save the arg file as UTF-8" in err


def test_utf8_with_byte_order_mark_is_read(data_dir):
    path = data_dir / "bom.json"
    path.write_bytes(json.dumps(base_values(output_dir="输出"), ensure_ascii=False).encode("utf-8-sig"))
    assert parse_train_args(path)[3].output_dir == "输出"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "output_dir": "out",\n}\n', "bad.json: line 3 column 1: not valid JSON"),
        ('["output_dir", "out"]', "bad.json: the top level is a list; expected a JSON object"),
        ('{"seed": 1, "seed": 2}', "bad.json: key seed appears twice"),
    ],
)
def test_malformed_json_is_one_line_with_the_place(data_dir, capsys, text, message):
    (data_dir / "bad.json").write_text(text, encoding="utf-8")
    assert message in refusal(capsys, "--train_args_file", str(data_dir / "bad.json"))


# --- item 24: paths are checked before any model loads ---------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train_file", "data/missing.csv"),
        ("test_file", "data/missing.csv"),
        ("image_path", "data/no_images"),
        ("clip_pretrain_path", "./pretrained/clip"),
        ("text_pretrain_path", "/nowhere/bert"),
        ("bert_pretrain_path", "/nowhere/bert"),  # the old name of text_pretrain_path
        ("model_name_or_path", "checkpoints/run1/final"),
    ],
)
def test_missing_path_is_refused_before_models_load(data_dir, capsys, key, value):
    path = write_json(data_dir / "a.json", base_values(**{key: value}))
    err = refusal(capsys, "--train_args_file", str(path))  # the autouse fixture fails on a model load
    assert f"{key.replace('bert_', 'text_')} {value!r}" in err


def test_bert_pretrain_path_is_the_old_name_of_text_pretrain_path(data_dir, capsys):
    path = write_json(data_dir / "a.json", base_values(bert_pretrain_path="bert-base-chinese"))
    assert parse_train_args(str(path))[0].text_pretrain_path == "bert-base-chinese"
    both = base_values(bert_pretrain_path="bert-base-chinese", text_pretrain_path="hfl/rbt3")
    err = refusal(capsys, "--train_args_file", str(write_json(data_dir / "b.json", both)))
    assert "bert_pretrain_path 'bert-base-chinese' and text_pretrain_path 'hfl/rbt3' disagree" in err


def test_hub_ids_are_left_to_the_loader(data_dir):
    values = base_values(
        clip_pretrain_path="openai/clip-vit-base-patch32", bert_pretrain_path="bert-base-chinese"
    )
    parse_train_args(write_json(data_dir / "a.json", values))
    assert not arg_checks.looks_local("Langboat/mengzi-bert-base")
    assert arg_checks.looks_local("./clip") and arg_checks.looks_local("~/models/clip")


# --- item 25: report_to packages and command-line overrides ----------------------------------


def test_report_to_without_its_package_says_what_to_install(data_dir, capsys, monkeypatch):
    monkeypatch.setattr(arg_checks, "_installed", lambda module: False)
    path = write_json(data_dir / "a.json", base_values(report_to=["tensorboard"]))
    assert "pip install tensorboard" in refusal(capsys, "--train_args_file", str(path))


def test_command_line_overrides_the_file(data_dir, monkeypatch):
    import component.training.run

    seen = {}
    monkeypatch.setattr(
        component.training.run, "run_training", lambda *arguments, **options: seen.update(args=arguments)
    )
    path = write_json(data_dir / "a.json", base_values(learning_rate=1e-3))
    train_clip.main(["--train_args_file", str(path), "--learning_rate", "1e-4", "--output_dir=x",
                     "--freeze_vision_model", "no", "--max_steps", "-1", "--use_cpu"])  # fmt: skip
    _, _, tower_args, training_args = seen["args"]
    assert training_args.learning_rate == 1e-4 and training_args.output_dir == "x"
    assert tower_args.freeze_vision_model is False and training_args.max_steps == -1 and training_args.use_cpu


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rate", "abc"], "command line: --learning_rate must be a number, got 'abc'"),
        (["--learning_rat", "1e-4"], "unknown key(s): --learning_rat (did you mean --learning_rate?)"),
        (["--freeze_text_model", "maybe"], "--freeze_text_model must be true or false, got 'maybe'"),
        (["--seed"], "command line: --seed needs a value"),
        (["--num_train_epochs", "0"], "num_train_epochs must be above 0"),
    ],
)
def test_bad_override_is_one_line(data_dir, capsys, argv, message):
    path = write_json(data_dir / "a.json", base_values())
    assert message in refusal(capsys, "--train_args_file", str(path), *argv)


def test_override_text_becomes_the_field_type():
    annotations = field_annotations()
    assert convert_text("report_to", "tensorboard,wandb", annotations["report_to"]) == [
        "tensorboard",
        "wandb",
    ]
    assert convert_text("report_to", '["wandb"]', annotations["report_to"]) == ["wandb"]
    assert convert_text("report_to", "none", annotations["report_to"]) == "none"
    assert convert_text("test_file", "null", annotations["test_file"]) is None
    assert convert_text("eval_steps", "none", annotations["eval_steps"]) is None
    assert command_line_overrides(["--unlock_vision_at", "100", "--use_cpu", "1"]) == {
        "unlock_vision_at": "100", "use_cpu": True}  # fmt: skip


def test_help_documents_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_clip.main(["--help"])
    assert exit_info.value.code == 0
    assert "--learning_rate 1e-4" in (out := capsys.readouterr().out) and "--KEY VALUE" in out


# --- item 19: a run that would learn nothing -------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_train_epochs": 0}, "num_train_epochs must be above 0, got 0"),
        ({"max_steps": 0}, "max_steps must be a positive number of steps, or -1"),
        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size 1 x 1 process(es)"),
    ],
)
def test_run_that_learns_nothing_is_refused(data_dir, capsys, values, message):
    path = write_json(data_dir / "a.json", base_values(**values))
    assert message in refusal(capsys, "--train_args_file", str(path))


def test_batch_of_one_per_process_is_fine_across_processes(monkeypatch):
    run = types.SimpleNamespace(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    arg_checks.check_training_length("a.json", run)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ArgumentError, match="loss of a one-row batch is 0"):
        arg_checks.check_training_length("a.json", run)
    long_run = types.SimpleNamespace(max_steps=5, num_train_epochs=0, per_device_train_batch_size=2)
    arg_checks.check_training_length("a.json", long_run)  # max_steps decides; epochs are not read


def test_csv_encoding_is_checked_and_reaches_the_reader(data_dir, capsys):
    arguments = parse_train_args(str(write_json(data_dir / "a.json", base_values(csv_encoding="gbk"))))
    assert arguments[1].csv_encoding == "gbk"
    message = refusal(capsys, "--train_args_file", str(write_json(data_dir / "b.json", base_values())),
                      "--csv_encoding", "klingon")  # fmt: skip
    assert "csv_encoding: unknown encoding 'klingon'" in message
