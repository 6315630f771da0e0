"""export_onnx.py on a tiny checkpoint: ONNX Runtime against PyTorch, the export directory, errors."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import export_onnx
from component.encoding import encode_images, encode_texts, image_array, load_model_and_processor
from component.formats import onnx_export, onnx_parity
from component.formats.onnx_export import (
    IMAGE_ENCODER_FILE,
    METADATA_FILE,
    TEXT_ENCODER_FILE,
    export_metadata,
)
from component.formats.onnx_parity import every_text_case, image_batches, onnx_session, text_batches
from component.model import BertCLIPModel
from component.processor import ImageTransform, load_processor, tokenize
from component.retrieval.index import model_fingerprint

BATCH_SIZES = (1, 3, 64)
MAX_LENGTH = 32  # the test model's max_position_embeddings, so that every length is cheap to check
TEXTS = ["一只猫", "两只狗在草地上奔跑", "红色的圆形", "一辆白色的汽车停在路边"]


@pytest.fixture(scope="module")
def short_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint's architecture with 32 text positions and new random weights."""
    config = BertCLIPModel.from_pretrained(tiny_checkpoint).config
    config.text_config.max_position_embeddings = MAX_LENGTH
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("short_checkpoint")
    BertCLIPModel(config).save_pretrained(directory)
    load_processor(tiny_checkpoint).save_pretrained(directory)
    return directory


@pytest.fixture
def short_model(short_checkpoint) -> BertCLIPModel:
    return BertCLIPModel.from_pretrained(short_checkpoint).eval()


@pytest.fixture(scope="module")
def export_dir(short_checkpoint, tmp_path_factory):
    """A float32 export written by the script's `main`, and what it printed."""
    output = tmp_path_factory.mktemp("onnx") / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_onnx.main(["--model_name_or_path", str(short_checkpoint), "--output", str(output)])
    return output, printed.getvalue()


@pytest.fixture(scope="module")
def float16_dir(short_checkpoint, tmp_path_factory):
    """A float16 export, checked by the exporter on a single batch of each kind."""
    model, processor = load_model_and_processor(short_checkpoint, "cpu")
    output = tmp_path_factory.mktemp("onnx") / "export16"
    onnx_export.export_onnx(
        model,
        processor,
        output,
        float16=True,
        text_cases=[(3, 8)],
        image_batch_sizes=(3,),
        report=lambda _: None,
    )
    return output


def run_text(session, inputs):
    return session.run(["text_features", "text_embeds"], {name: t.numpy() for name, t in inputs.items()})


def test_text_encoder_matches_pytorch_at_every_batch_size_and_length(export_dir, short_model):
    session = onnx_session(export_dir[0] / TEXT_ENCODER_FILE)
    cases = every_text_case(MAX_LENGTH, BATCH_SIZES)
    worst = 0.0
    with torch.inference_mode():
        for _, inputs in text_batches(short_model, cases, seed=1):
            features = short_model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
            got_features, got_embeds = run_text(session, inputs)
            worst = max(
                worst,
                (torch.from_numpy(got_features) - features).abs().max().item(),
                (torch.from_numpy(got_embeds) - F.normalize(features, dim=-1)).abs().max().item(),
            )
    assert len(cases) == 3 * MAX_LENGTH == 3 * short_model.config.text_config.max_position_embeddings
    assert worst <= 1e-4


def test_image_encoder_matches_pytorch_at_batch_sizes_1_3_64(export_dir, short_model):
    session = onnx_session(export_dir[0] / IMAGE_ENCODER_FILE)
    with torch.inference_mode():
        for _, inputs in image_batches(short_model, BATCH_SIZES, seed=1):
            features = short_model.get_image_features(inputs["pixel_values"])
            got_features, got_embeds = session.run(None, {"pixel_values": inputs["pixel_values"].numpy()})
            assert got_features.shape == (len(features), short_model.config.projection_dim)
            assert (torch.from_numpy(got_features) - features).abs().max().item() <= 1e-4
            assert (torch.from_numpy(got_embeds) - F.normalize(features, dim=-1)).abs().max().item() <= 1e-4


def test_processor_inputs_give_the_embeddings_of_encode_texts_and_encode_images(
    export_dir, short_model, tmp_path
):
    processor = load_processor(export_dir[0])  # the processor saved with the export
    text_inputs = tokenize(processor, TEXTS, max_length=MAX_LENGTH)
    _, text_embeds = run_text(
        onnx_session(export_dir[0] / TEXT_ENCODER_FILE),
        {name: text_inputs[name] for name in ("input_ids", "attention_mask")},
    )
    expected = encode_texts(short_model, processor, TEXTS, max_length=MAX_LENGTH)
    assert (torch.from_numpy(text_embeds) - expected).abs().max().item() <= 1e-4

    image = Image.new("RGB", (48, 40), "teal")
    ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill="yellow")
    transform = ImageTransform.from_processor(processor)
    pixel_values = transform.to_pixel_values([image_array(transform, image)], torch.device("cpu"))
    _, image_embeds = onnx_session(export_dir[0] / IMAGE_ENCODER_FILE).run(
        None, {"pixel_values": pixel_values.numpy()}
    )
    expected = encode_images(short_model, processor, [image])
    assert (torch.from_numpy(image_embeds) - expected).abs().max().item() <= 1e-4


def test_graphs_have_named_inputs_and_outputs_with_dynamic_batch_and_sequence(export_dir):
    text = onnx_session(export_dir[0] / TEXT_ENCODER_FILE)
    image = onnx_session(export_dir[0] / IMAGE_ENCODER_FILE)
    assert [(i.name, i.shape, i.type) for i in text.get_inputs()] == [
        ("input_ids", ["batch", "sequence"], "tensor(int64)"),
        ("attention_mask", ["batch", "sequence"], "tensor(int64)"),
    ]
    assert [o.name for o in text.get_outputs()] == ["text_features", "text_embeds"]
    assert [(i.name, i.shape[0], i.type) for i in image.get_inputs()] == [
        ("pixel_values", "batch", "tensor(float)")
    ]
    assert [o.name for o in image.get_outputs()] == ["image_features", "image_embeds"]


def test_metadata_holds_the_logit_scale_and_the_script_reports_parity(export_dir, short_model):
    output, printed = export_dir
    metadata = json.loads((output / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["logit_scale"] == pytest.approx(short_model.logit_scale.item())
    assert "logit_bias" not in metadata
    assert metadata["dtype"] == "float32"
    assert metadata["max_seq_length"] == short_model.config.text_config.max_position_embeddings
    assert [path.name for path in output.iterdir() if path.name.startswith(".")] == []  # no staging left
    # the fingerprint a search index records for the model its graphs came from
    assert metadata["model_fingerprint"] == model_fingerprint(short_model, load_processor(output))
    assert "text_encoder.onnx: max abs diff" in printed
    assert "image_encoder.onnx: max abs diff" in printed
    assert "FAILED" not in printed


def test_metadata_has_the_logit_bias_of_a_model_that_has_one(short_model):
    short_model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    assert export_metadata(short_model, opset=20, float16=False)["logit_bias"] == -10.0


def test_float16_embeddings_have_cosine_at_least_0999(float16_dir, short_model):
    text = onnx_session(float16_dir / TEXT_ENCODER_FILE)
    image = onnx_session(float16_dir / IMAGE_ENCODER_FILE)
    assert text.get_inputs()[0].type == "tensor(int64)"
    assert image.get_inputs()[0].type == "tensor(float)"  # float32 at the edges
    with torch.inference_mode():
        for _, inputs in text_batches(short_model, every_text_case(MAX_LENGTH, BATCH_SIZES)):
            expected = F.normalize(short_model.get_text_features(**inputs), dim=-1)
            cosine = (torch.from_numpy(run_text(text, inputs)[1]) * expected).sum(-1)
            assert cosine.min().item() >= 0.999
        for _, inputs in image_batches(short_model, BATCH_SIZES):
            expected = F.normalize(short_model.get_image_features(**inputs), dim=-1)
            _, embeds = image.run(None, {"pixel_values": inputs["pixel_values"].numpy()})
            assert (torch.from_numpy(embeds) * expected).sum(-1).min().item() >= 0.999
    assert json.loads((float16_dir / METADATA_FILE).read_text(encoding="utf-8"))["dtype"] == "float16"


def test_out_of_tolerance_exits_1_and_leaves_the_earlier_export(
    export_dir, short_checkpoint, monkeypatch, capsys
):
    output = export_dir[0]
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def reuse_graph(model, path, opset=None):  # the earlier export's graph, to save tracing again
        shutil.copyfile(output / path.name, path)
        return 20

    monkeypatch.setattr(onnx_export, "export_text_encoder", reuse_graph)
    monkeypatch.setattr(onnx_export, "export_image_encoder", reuse_graph)
    monkeypatch.setattr(onnx_parity, "FLOAT32_MAX_ABS_DIFF", -1.0)  # nothing can pass
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(short_checkpoint), "--output", str(output)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: out of tolerance")
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


def test_a_directory_that_is_not_a_model_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_that_is_not_an_export_is_refused(short_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(short_checkpoint), "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_an_opset_below_18_is_refused(short_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(
            ["--model_name_or_path", str(short_checkpoint), "--output", str(tmp_path), "--opset", "14"]
        )
    assert exit_info.value.code == 2
    assert "--opset must be between 18" in capsys.readouterr().err
