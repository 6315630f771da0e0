"""The CUDA paths: bf16 training, on-GPU normalisation, the bf16 feature cache, inductor.

Skipped without a CUDA device, so CI (CPU only) never runs them; `bash scripts/gpu_check.sh` runs
them on a GPU machine together with the GPU benchmark. Each compares with the CPU in float32.
"""

import numpy as np
import pytest
import torch
from _runs import tiny_run_args, write_args
from transformers import TrainerCallback

from component.model import BertCLIPModel
from component.processor import ImageTransform, load_processor
from component.training.arguments import parse_train_args
from component.training.dataset import ImageTextDataset, read_image_text_csv
from component.training.feature_cache import compute_image_features
from component.training.run import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
ON_DEVICE = {"use_cpu": False, "dataloader_pin_memory": True, "dataloader_num_workers": 2}


class TrainingDtypes(TrainerCallback):
    """The device of the model and the dtypes both towers' projections output while training."""

    def __init__(self):
        self.dtypes, self.device = set(), None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.device = next(model.parameters()).device.type
        for projection in (model.text_projection, model.visual_projection):
            projection.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))


def train(tiny_towers, shapes, output, callbacks=(), **overrides) -> dict:
    values = tiny_run_args(tiny_towers, shapes, output, max_steps=6, seed=3, **overrides)
    arg_file = write_args(output.with_suffix(".json"), **values)
    return run_training(*parse_train_args(arg_file), extra_callbacks=tuple(callbacks))


def test_uint8_batch_normalised_on_the_device_equals_the_cpu(tiny_checkpoint):
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    batch = torch.randint(0, 256, (4, 30, 30, 3), dtype=torch.uint8)
    on_device = transform.to_pixel_values(batch, DEVICE)
    assert on_device.device.type == DEVICE
    torch.testing.assert_close(on_device.cpu(), transform.to_pixel_values(batch), atol=1e-6, rtol=0)


def test_bf16_training_on_the_device_learns_like_float32_on_the_cpu(tiny_towers, shapes, tmp_path):
    reference = train(tiny_towers, shapes, tmp_path / "cpu_fp32")
    probe = TrainingDtypes()
    result = train(tiny_towers, shapes, tmp_path / "bf16", (probe,), bf16=True, **ON_DEVICE)
    assert probe.device == DEVICE and probe.dtypes == {torch.bfloat16}
    assert result["train_loss"] == pytest.approx(reference["train_loss"], rel=0.05)
    assert result["eval_loss"] == pytest.approx(reference["eval_loss"], rel=0.05)
    saved = BertCLIPModel.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}  # the weights stay float32


def test_bf16_feature_cache_is_close_to_float32(tiny_checkpoint, shapes):
    model = BertCLIPModel.from_pretrained(tiny_checkpoint)
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    dataset = ImageTextDataset(read_image_text_csv(shapes / "train.csv"), shapes / "images", transform)
    reference, valid = compute_image_features(model, dataset, 16, 0, "cpu")
    on_device, valid_on_device = compute_image_features(model.to(DEVICE), dataset, 16, 2, DEVICE)
    np.testing.assert_array_equal(valid_on_device, valid)
    cosine = (reference * on_device).sum(-1) / np.linalg.norm(reference, axis=-1)
    cosine = cosine / np.linalg.norm(on_device, axis=-1)
    assert cosine.min() > 0.999  # bf16 autocast moves a feature, not its direction


def test_cached_lit_on_the_device_matches_uncached(tiny_towers, shapes, tmp_path):
    uncached = train(tiny_towers, shapes, tmp_path / "uncached", **ON_DEVICE)
    cached = train(tiny_towers, shapes, tmp_path / "cached", cache_image_features=True, **ON_DEVICE)
    assert cached["train_loss"] == pytest.approx(uncached["train_loss"], rel=0.01)


def test_full_bf16_training_with_inductor_and_gradient_caching(tiny_towers, shapes, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train(
        tiny_towers,
        shapes,
        tmp_path / "compiled",
        freeze_vision_model=False,
        freeze_vision_projection=False,
        bf16=True,
        torch_compile=True,
        gradient_checkpointing=True,
        contrastive_accumulation_steps=2,
        **ON_DEVICE,
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["eval_loss"])


def test_siglip_bf16_training_on_the_device_learns_like_float32_on_the_cpu(tiny_towers, shapes, tmp_path):
    reference = train(tiny_towers, shapes, tmp_path / "cpu_fp32", loss="siglip")
    result = train(tiny_towers, shapes, tmp_path / "bf16", loss="siglip", bf16=True, **ON_DEVICE)
    assert result["train_loss"] == pytest.approx(reference["train_loss"], rel=0.05)
    saved = BertCLIPModel.from_pretrained(tmp_path / "bf16")
    assert saved.logit_bias is not None and saved.logit_bias.dtype == torch.float32


def test_gradient_cached_siglip_with_dedupe_on_the_device(tiny_towers, shapes, tmp_path):
    result = train(tiny_towers, shapes, tmp_path / "gc", loss="siglip", contrastive_accumulation_steps=2,
                   dedupe_captions_in_batch=True, bf16=True, **ON_DEVICE)  # fmt: skip
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["eval_loss"])
