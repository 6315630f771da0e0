"""Every script prints what the user must fix (a UserError) as one line, with exit status 2."""

import importlib

import pytest


def bad_inputs(tmp_path) -> dict[str, list[str]]:
    """A command line for each script whose input does not exist."""
    missing = str(tmp_path / "missing")
    return {
        "train_clip": ["--train_args_file", missing + ".json"],
        "predict_similarity": ["--model_name_or_path", missing, "--texts", "一只猫", "一只狗"],
        "retrieval": ["search", "--index", missing, "--text", "一只猫"],
        "download_image": ["--input", missing + ".csv", "--output", str(tmp_path / "out")],
        "filter_data": [
            "--input",
            missing + ".csv",
            "--image_path",
            str(tmp_path),
            "--output",
            str(tmp_path / "kept.csv"),
        ],
        "evaluate": ["--model_name_or_path", missing, "--test_file", missing + ".csv"],
        "convert_checkpoint": [
            "from-cn-clip",
            "--checkpoint",
            missing + ".pt",
            "--output",
            str(tmp_path / "o"),
        ],
        "export_onnx": ["--model_name_or_path", missing, "--output", str(tmp_path / "onnx")],
    }


@pytest.mark.parametrize(
    "script",
    [
        "train_clip",
        "predict_similarity",
        "retrieval",
        "download_image",
        "filter_data",
        "evaluate",
        "convert_checkpoint",
        "export_onnx",
    ],
)
def test_a_user_error_is_one_line_and_exit_2(script, tmp_path, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_info:
        code = main(bad_inputs(tmp_path)[script])
        raise SystemExit(code)  # the data tools return their exit status
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing" in errors[0] and "Traceback" not in err
