"""Check exported encoders against PyTorch: random inputs, ONNX Runtime beside the model, tolerances.

Text batches are right-padded like the tokenizer's, so that the attention mask matters; the
float32 graphs must agree within `FLOAT32_MAX_ABS_DIFF`, float16 ones (against float32 PyTorch)
by cosine within `FLOAT16_MIN_COSINE`.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from component.encoding import model_device
from component.model import BertCLIPModel

FLOAT32_MAX_ABS_DIFF = 1e-4  # ONNX Runtime vs PyTorch, features and embeddings
FLOAT16_MIN_COSINE = 0.999  # float16 graph vs float32 PyTorch, per embedding


@dataclass(frozen=True)
class Parity:
    """How far one exported encoder's outputs are from PyTorch's over the checked inputs."""

    file: str
    inputs: int  # batches checked
    max_abs_diff: float  # over features and embeddings
    min_cosine: float  # of the embeddings
    max_abs_diff_at: str  # the batch where it occurred, e.g. "batch 64, length 17"
    min_cosine_at: str

    def passed(self, float16: bool) -> bool:
        """Within tolerance: max abs diff for float32, cosine for float16."""
        if float16:
            return self.min_cosine >= FLOAT16_MIN_COSINE
        return self.max_abs_diff <= FLOAT32_MAX_ABS_DIFF

    def describe(self, float16: bool) -> str:
        """One line: the figure that decides, where it is worst, the limit and the verdict."""
        verdict = "ok" if self.passed(float16) else "FAILED"
        if float16:
            figure = f"min cosine {self.min_cosine:.6f} (at {self.min_cosine_at}; limit {FLOAT16_MIN_COSINE})"
        else:
            limit = f"{FLOAT32_MAX_ABS_DIFF:.0e}"
            figure = f"max abs diff {self.max_abs_diff:.2e} (at {self.max_abs_diff_at}; limit {limit})"
        return f"{self.file}: {figure} over {self.inputs} batches: {verdict}"


def onnx_session(path: Path):
    """An ONNX Runtime session on the CPU for the graph at `path`, its threads not spinning when idle."""
    import onnxruntime

    # The parity check alternates ONNX Runtime and PyTorch on the same cores: threads that spin
    # between runs (the default) starve PyTorch's, which then runs ten times slower.
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(
    file: str, encoder: nn.Module, session, batches: Iterable[tuple[str, dict[str, torch.Tensor]]]
) -> Parity:
    """Run each (label, inputs) batch through `encoder` (float32 PyTorch) and `session`; the worst case."""
    device = model_device(encoder)
    output_names = [output.name for output in session.get_outputs()]
    worst_diff, min_cosine, diff_at, cosine_at, count = -1.0, 2.0, "", "", 0
    with torch.inference_mode():
        for label, inputs in batches:
            reference = encoder.eval()(**{name: tensor.to(device) for name, tensor in inputs.items()})
            reference = [tensor.float().cpu().numpy() for tensor in reference]  # features, embeds
            outputs = session.run(output_names, {name: tensor.numpy() for name, tensor in inputs.items()})
            diff = max(float(np.abs(got - want).max()) for got, want in zip(outputs, reference, strict=True))
            cosine = float((outputs[1].astype(np.float64) * reference[1]).sum(axis=-1).min())
            count += 1
            if diff > worst_diff:
                worst_diff, diff_at = diff, label
            if cosine < min_cosine:
                min_cosine, cosine_at = cosine, label
    return Parity(file, count, worst_diff, min_cosine, diff_at, cosine_at)


def text_inputs(
    batch_size: int, length: int, vocab_size: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded as the tokenizer pads a batch: the first text is `length`
    tokens long, the others 1 to `length`."""
    input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
    lengths[0] = length
    attention_mask = (torch.arange(length) < lengths[:, None]).long()  # [batch, length]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def text_batches(
    model: BertCLIPModel, cases: Iterable[tuple[int, int]], seed: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A random text batch per (batch_size, length) case, labelled."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.config.text_config.vocab_size
    for batch_size, length in cases:
        yield f"batch {batch_size}, length {length}", text_inputs(batch_size, length, vocab_size, generator)


def image_batches(
    model: BertCLIPModel, batch_sizes: Iterable[int], seed: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Random pixel values (normalised images are roughly standard normal) per batch size, labelled."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    for batch_size in batch_sizes:
        yield (
            f"batch {batch_size}",
            {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)},
        )


def every_text_case(max_length: int, batch_sizes: Iterable[int] = (1, 3, 64)) -> list[tuple[int, int]]:
    """Each batch size at every sequence length from 1 to `max_length`."""
    return [(batch_size, length) for batch_size in batch_sizes for length in range(1, max_length + 1)]


def sampled_text_cases(max_length: int) -> list[tuple[int, int]]:
    """What the export script checks: batch 1 and 3 at lengths 1, 2, 3, the powers of two below
    `max_length` and `max_length` itself; batch 64 at lengths 1 and 16 (longer costs minutes on a CPU)."""
    lengths = sorted({1, 2, 3, max_length} | {2**power for power in range(2, max_length.bit_length())})
    lengths = [length for length in lengths if length <= max_length]
    return [(batch_size, length) for batch_size in (1, 3) for length in lengths] + [
        (64, length) for length in sorted({1, min(16, max_length)})
    ]
