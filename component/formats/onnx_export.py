"""Export a BertCLIP checkpoint's two towers to ONNX and check the graphs against PyTorch.

`export_onnx` writes, into one directory:

- text_encoder.onnx: input_ids, attention_mask [batch, sequence] (int64) -> text_features,
  text_embeds [batch, projection_dim] (float32);
- image_encoder.onnx: pixel_values [batch, 3, size, size] (float32) -> image_features, image_embeds;
- the processor (tokenizer and image processor), so that inputs are prepared as in training;
- onnx_export.json: the logit scale (and bias, for a model that has one), names and sizes.

`*_features` are the projected features, `*_embeds` the same L2-normalised, as `encode_texts` and
`encode_images` return them. Batch size is dynamic in both graphs, sequence length in the text one.
Everything is first written to a staging folder inside the output directory and renamed into
place only after the parity check passed: a failed or interrupted export leaves no half-written
file, and nothing already there is deleted.

onnx, onnxruntime and onnxscript are optional dependencies, imported only where used.
"""

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from component.encoding import logit_bias_of, model_device
from component.errors import InputError
from component.formats.onnx_parity import (
    Parity,
    compare,
    image_batches,
    onnx_session,
    sampled_text_cases,
    text_batches,
)
from component.model import BertCLIPModel
from component.retrieval.index import model_fingerprint
from component.text_tower import max_text_length
from datatools.errors import UserError

TEXT_ENCODER_FILE = "text_encoder.onnx"
IMAGE_ENCODER_FILE = "image_encoder.onnx"
METADATA_FILE = "onnx_export.json"
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUTS = ("text_features", "text_embeds")
IMAGE_INPUTS = ("pixel_values",)
IMAGE_OUTPUTS = ("image_features", "image_embeds")
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
# torch's exporter implements opset 18 and converts the graph to a later one on request; converting
# to an earlier one fails for BERT, and the exporter then silently keeps 18.
MIN_OPSET = 18
_PROTOBUF_LIMIT = 2**31 - 2**26  # weights beyond about 2 GB go to a .data file beside the graph
_STAGING_PREFIX = ".onnx-export-"


class ExportError(UserError):
    """The export cannot run as asked: a missing package, or an opset the exporter cannot produce."""


class ParityError(ExportError):
    """An exported graph's outputs differ from PyTorch's beyond the tolerance; nothing was written."""

    exit_code = 1


class TextEncoder(nn.Module):
    """input_ids, attention_mask [batch, sequence] -> (text_features, text_embeds) [batch, projection_dim]."""

    def __init__(self, model: BertCLIPModel):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Single texts have one segment, so token_type_ids are zeros, as the tokenizer gives them.
        features = self.model.get_text_features(input_ids, attention_mask, torch.zeros_like(input_ids))
        return features, F.normalize(features, dim=-1)


class ImageEncoder(nn.Module):
    """pixel_values [batch, 3, size, size] -> (image_features, image_embeds) [batch, projection_dim]."""

    def __init__(self, model: BertCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.get_image_features(pixel_values)
        return features, F.normalize(features, dim=-1)


def require_onnx() -> None:
    """Refuse to start without the optional ONNX packages, naming the missing ones."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: pip install '.[onnx]' "
            f"(or pip install {' '.join(ONNX_PACKAGES)})"
        )


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot produce or this onnx does not know."""
    import onnx

    latest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= latest:
        raise ExportError(
            f"--opset must be between {MIN_OPSET} and {latest} (this onnx's latest), got {opset}"
        )


def check_output(output: Path) -> None:
    """Accept a new or empty directory or an earlier export as `output`; refuse anything else."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if output.is_dir() and not (output / METADATA_FILE).is_file():
        # Staging folders of an interrupted export do not make a directory "not empty".
        others = [path.name for path in output.iterdir() if not path.name.startswith(_STAGING_PREFIX)]
        if others:
            raise InputError(
                f"{output}: the directory is not empty and holds no earlier ONNX export "
                f"(no {METADATA_FILE}); give a new or empty directory"
            )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs a warning per torchvision operator it cannot register, and warns about
    # dimension names that two inputs share; neither concerns these graphs.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_encoder(
    encoder: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    opset: int | None = None,
) -> int:
    """Export `encoder` with torch.export (`dynamo=True`) to `path`; return the graph's opset.

    `dynamic_axes` names the dynamic dimensions of each input, e.g. {"pixel_values": {0: "batch"}}.
    Weights over about 2 GB are saved beside the graph as `path`.data.
    """
    import onnx

    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            encoder.eval(),
            tuple(example_inputs.values()),
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=list(example_inputs),
            output_names=list(output_names),
            dynamic_shapes=dynamic_axes,
        )
    program.save(str(path))
    graph = onnx.load(str(path), load_external_data=False)
    produced = next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
    if opset is not None and produced != opset:
        raise ExportError(f"{path.name}: the exporter produced opset {produced}, not the requested {opset}")
    return produced


def export_text_encoder(model: BertCLIPModel, path: Path, opset: int | None = None) -> int:
    """Write the text tower plus projection to `path`; dynamic batch and sequence length."""
    length = min(8, max_text_length(model.config.text_config))
    # Batch 2, not 1: torch.export would take a size of 1 for a constant.
    input_ids = torch.ones(2, length, dtype=torch.long, device=model_device(model))
    example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
    return export_encoder(TextEncoder(model), example, TEXT_OUTPUTS, axes, path, opset)


def export_image_encoder(model: BertCLIPModel, path: Path, opset: int | None = None) -> int:
    """Write the image tower plus projection to `path`; dynamic batch."""
    size = model.config.vision_config.image_size
    example = {"pixel_values": torch.zeros(2, 3, size, size, device=model_device(model))}
    return export_encoder(
        ImageEncoder(model), example, IMAGE_OUTPUTS, {"pixel_values": {0: "batch"}}, path, opset
    )


def convert_to_float16(path: Path) -> None:
    """Rewrite the graph at `path` with float16 weights and arithmetic; inputs and outputs stay float32.

    Keeping float32 at the edges gives both variants one interface (the processor's pixel values
    go in unchanged), at the cost of one cast per input and output.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    weights = path.with_name(path.name + ".data")
    weights.unlink(missing_ok=True)  # the float32 weights, in the staging folder
    external = sum(len(tensor.raw_data) for tensor in graph.graph.initializer) > _PROTOBUF_LIMIT
    onnx.save_model(
        graph, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=weights.name
    )


def export_metadata(model: BertCLIPModel, opset: int, float16: bool) -> dict:
    """onnx_export.json: what a runtime needs beside the graphs, the logit scale above all."""
    config = model.config
    metadata = {
        # logits = cosine * exp(logit_scale), as in the PyTorch model
        "logit_scale": float(model.logit_scale.detach().float().item()),
        "dtype": "float16" if float16 else "float32",
        "opset": opset,
        "projection_dim": config.projection_dim,
        "max_seq_length": max_text_length(config.text_config),
        "image_size": config.vision_config.image_size,
        "text_pooling": config.text_pooling,
        "text_encoder": {"file": TEXT_ENCODER_FILE, "inputs": TEXT_INPUTS, "outputs": TEXT_OUTPUTS},
        "image_encoder": {"file": IMAGE_ENCODER_FILE, "inputs": IMAGE_INPUTS, "outputs": IMAGE_OUTPUTS},
        "source": str(getattr(model, "name_or_path", "")),
        "torch": torch.__version__,
    }
    logit_bias = logit_bias_of(model)  # a sigmoid-loss (SigLIP) model adds one
    if logit_bias is not None:
        metadata["logit_bias"] = logit_bias
    return metadata


def publish(staging: Path, output: Path) -> None:
    """Move every file from `staging` into `output`, each by one atomic rename.

    Weights go before graphs and graphs before the metadata, so that whoever finds
    onnx_export.json finds everything it names.
    """
    names = sorted(path.name for path in staging.iterdir())
    names.sort(key=lambda name: (name == METADATA_FILE, name.endswith(".onnx")))
    for name in names:
        os.replace(staging / name, output / name)


def check_encoders(model: BertCLIPModel, directory: Path, text_cases, image_batch_sizes) -> list[Parity]:
    """Parity of the two graphs in `directory` with the PyTorch model, text first."""
    text = compare(
        TEXT_ENCODER_FILE,
        TextEncoder(model),
        onnx_session(directory / TEXT_ENCODER_FILE),
        text_batches(model, text_cases),
    )
    image = compare(
        IMAGE_ENCODER_FILE,
        ImageEncoder(model),
        onnx_session(directory / IMAGE_ENCODER_FILE),
        image_batches(model, image_batch_sizes),
    )
    return [text, image]


def export_onnx(
    model: BertCLIPModel,
    processor,
    output: str | Path,
    opset: int | None = None,
    float16: bool = False,
    text_cases: Iterable[tuple[int, int]] | None = None,
    image_batch_sizes: Iterable[int] = (1, 3, 64),
    report: Callable[[str], object] = print,
) -> list[Parity]:
    """Export both encoders, the processor and onnx_export.json to `output`, after checking parity.

    Args:
        model: a float32 model (`--fp16` converts the exported graphs, not the model).
        text_cases: (batch_size, length) pairs to check the text encoder on; default
            `sampled_text_cases(max_text_length(text_config))`.
        report: called with each progress line.

    Raises `ParityError` (and writes nothing) when a graph is out of tolerance.
    """
    require_onnx()
    check_opset(opset)
    output = Path(output)
    check_output(output)
    output.mkdir(parents=True, exist_ok=True)
    if text_cases is None:
        text_cases = sampled_text_cases(max_text_length(model.config.text_config))
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=output))
    try:
        report(f"exporting the text encoder to {output / TEXT_ENCODER_FILE}")
        produced = export_text_encoder(model, staging / TEXT_ENCODER_FILE, opset)
        report(f"exporting the image encoder to {output / IMAGE_ENCODER_FILE}")
        export_image_encoder(model, staging / IMAGE_ENCODER_FILE, opset)
        if float16:
            report("converting both graphs to float16")
            for name in (TEXT_ENCODER_FILE, IMAGE_ENCODER_FILE):
                convert_to_float16(staging / name)
        report("checking the graphs with ONNX Runtime against PyTorch")
        results = check_encoders(model, staging, text_cases, image_batch_sizes)
        for result in results:
            report(result.describe(float16))
        failed = [result.describe(float16) for result in results if not result.passed(float16)]
        if failed:
            raise ParityError(f"out of tolerance, nothing written to {output}: {'; '.join(failed)}")
        processor.save_pretrained(str(staging))
        metadata = export_metadata(model, produced, float16)
        # lets a search index check that the graphs encode as the model it was built with did
        metadata["model_fingerprint"] = model_fingerprint(model, processor)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only this run's own staging folder
    return results
