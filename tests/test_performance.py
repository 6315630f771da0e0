"""Performance features keep results exact: gradient caching, cached image features, draft decoding."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import tiny_run_args, write_args
from PIL import Image
from transformers import TrainerCallback

import train_clip
from component.loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, siglip_loss
from component.model import BertCLIPModel
from component.processor import ImageTransform, load_processor
from component.training.arguments import parse_train_args
from component.training.dataset import ImageTextDataset, read_image_text_csv
from component.training.feature_cache import CachedImageTextDataset, Shard, load_or_build_cache
from component.training.grad_cache import gradient_cached_backward, split_batch
from component.training.run import run_training


def no_dropout_model(checkpoint) -> BertCLIPModel:
    model = BertCLIPModel.from_pretrained(checkpoint)
    model.config.text_config.hidden_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def batch_of(checkpoint, shapes, size=8) -> dict:
    processor = load_processor(checkpoint)
    rows = read_image_text_csv(shapes / "train.csv")
    texts = [rows.texts[i] for i in range(size)]
    images = [Image.open(shapes / "images" / rows.filenames[i]) for i in range(size)]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunks", [2, 4])
def test_gradient_caching_equals_one_big_batch(tiny_checkpoint, shapes, chunks):
    batch = batch_of(tiny_checkpoint, shapes)
    reference = no_dropout_model(tiny_checkpoint)
    expected_loss = reference(**batch, return_loss=True).loss
    expected_loss.backward()
    expected = gradients(reference)

    model = no_dropout_model(tiny_checkpoint)
    loss = gradient_cached_backward(model, model.logit_scale, split_batch(batch, chunks), loss_scale=1.0)
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-6, rtol=1e-5)
    got = gradients(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dedupe", [False, True])
def test_gradient_caching_with_siglip_equals_one_big_batch(tiny_checkpoint, shapes, dedupe):
    batch = batch_of(tiny_checkpoint, shapes)
    # Rows 0, 3 and 6 share a caption (as far as the loss is told), so the mask spans micro-batches.
    captions = torch.tensor([0, 1, 2, 0, 4, 5, 0, 7])
    same_caption = captions.unsqueeze(1) == captions.unsqueeze(0) if dedupe else None
    reference = no_dropout_model(tiny_checkpoint)
    reference.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    outputs = reference(**batch)
    expected_loss = siglip_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale,
                                outputs.logit_bias, same_caption=same_caption)  # fmt: skip
    expected_loss.backward()
    expected = gradients(reference)

    model = no_dropout_model(tiny_checkpoint)
    model.add_logit_bias(SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS)
    loss = gradient_cached_backward(
        model, model.logit_scale, split_batch(batch, 4), loss_scale=1.0,
        loss_function=siglip_loss, logit_bias=model.logit_bias, same_caption=same_caption,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)
    got = gradients(model)
    assert got.keys() == expected.keys() and "logit_bias" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_caching_replays_dropout(tiny_checkpoint, shapes):
    """With dropout on, pass 2 must see the masks of pass 1, or the cached gradients are wrong."""
    batch = batch_of(tiny_checkpoint, shapes)
    model = BertCLIPModel.from_pretrained(tiny_checkpoint).train()
    torch.manual_seed(3)
    gradient_cached_backward(model, model.logit_scale, split_batch(batch, 2), loss_scale=1.0)
    first = gradients(model)
    model.zero_grad()
    torch.manual_seed(3)
    gradient_cached_backward(model, model.logit_scale, split_batch(batch, 2), loss_scale=1.0)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, first[name], msg=name)


def write_run_args(tiny_towers, shapes, output, **overrides) -> Path:
    """Two epochs by default, so that the cached-feature runs reuse their cache."""
    values = tiny_run_args(tiny_towers, shapes, output, max_steps=-1, num_train_epochs=2, seed=11)
    return write_args(output.parent / f"{output.name}.json", **{**values, **overrides})


def run(tiny_towers, shapes, output, **overrides) -> dict:
    arg_file = write_run_args(tiny_towers, shapes, output, **overrides)
    return train_clip.main(["--train_args_file", str(arg_file)])


def test_cached_image_features_match_the_uncached_run(tiny_towers, shapes, tmp_path):
    uncached = run(tiny_towers, shapes, tmp_path / "uncached")
    cached = run(tiny_towers, shapes, tmp_path / "cached", cache_image_features=True)
    assert abs(cached["train_loss"] - uncached["train_loss"]) <= 0.01 * uncached["train_loss"]
    assert abs(cached["eval_loss"] - uncached["eval_loss"]) <= 0.01 * uncached["eval_loss"]
    cache_files = sorted((tmp_path / "cached" / "image_feature_cache").glob("*.features.npy"))
    assert len(cache_files) == 2  # train and test
    stamps = [f.stat().st_mtime_ns for f in cache_files]
    run(tiny_towers, shapes, tmp_path / "cached", cache_image_features=True, num_train_epochs=3)
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps  # reused, not recomputed


def test_contrastive_accumulation_run_trains(tiny_towers, shapes, tmp_path):
    metrics = run(tiny_towers, shapes, tmp_path / "gc", contrastive_accumulation_steps=2, max_steps=3)
    assert np.isfinite(metrics["train_loss"])


def test_cached_dataset_replaces_bad_rows_like_the_uncached_one(
    tiny_model, tiny_checkpoint, shapes, tmp_path
):
    csv = tmp_path / "rows.csv"
    csv.write_text("text,filename\n一,train-0.jpg\n二,missing.jpg\n三,train-2.jpg\n")
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    dataset = ImageTextDataset(read_image_text_csv(csv), shapes / "images", transform)
    features, valid = load_or_build_cache(tiny_model, dataset, tmp_path / "cache", 2, 0, "cpu")
    assert valid.tolist() == [True, False, True]
    cached = CachedImageTextDataset(dataset.source, features, valid)
    for index in range(3):
        assert cached[index]["index"] == dataset[index]["index"]
        assert cached[index]["text"] == dataset[index]["text"]
    with torch.no_grad():
        expected = tiny_model.get_image_features(transform.to_pixel_values([dataset.load_image(0)]))
    np.testing.assert_allclose(cached[0]["image_features"], expected[0].numpy(), rtol=2e-3, atol=2e-3)


def test_draft_decoding_keeps_shape_and_values_close(tiny_checkpoint, tmp_path):
    gradient = np.linspace(0, 255, 1200, dtype=np.float32)
    pixels = np.stack([np.add.outer(gradient[:900] * 0.5, gradient * 0.5)] * 3, axis=-1).astype(np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    transform = ImageTransform.from_processor(load_processor(tiny_checkpoint))
    full = transform(transform.load(path, draft=False)).astype(np.float32)
    draft = transform(transform.load(path, draft=True)).astype(np.float32)
    assert full.shape == draft.shape == (30, 30, 3)
    assert np.abs(full - draft).mean() < 3.0  # of 255


class ProjectionDtypes(TrainerCallback):
    """Records the dtypes that both towers' projections output during training."""

    def __init__(self):
        self.dtypes = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for projection in (model.text_projection, model.visual_projection):
            projection.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))


def test_bf16_run_computes_in_bf16_and_learns_like_float32(tiny_towers, shapes, tmp_path):
    float32 = run(tiny_towers, shapes, tmp_path / "fp32", max_steps=4)
    probe = ProjectionDtypes()
    arg_file = write_run_args(tiny_towers, shapes, tmp_path / "bf16", max_steps=4, bf16=True)
    bf16 = run_training(*parse_train_args(arg_file), extra_callbacks=(probe,))
    assert probe.dtypes == {torch.bfloat16}  # autocast reached both towers
    assert abs(bf16["train_loss"] - float32["train_loss"]) <= 0.05 * float32["train_loss"]


def test_torch_compile_run_trains(tiny_towers, shapes, tmp_path):
    # aot_eager traces forward and backward as inductor would, without minutes of C++ compilation.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    metrics = run(tiny_towers, shapes, tmp_path / "compiled", max_steps=2,
                  torch_compile=True, torch_compile_backend="aot_eager")  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["eval_loss"])


class CheckpointingFlags(TrainerCallback):
    """Whether each tower's encoder layers recompute their activations, as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.flags = {
            "text": all(layer.gradient_checkpointing for layer in model.text_model.encoder.layer),
            "vision": all(layer.gradient_checkpointing for layer in model.vision_model.encoder.layers),
        }


def test_gradient_checkpointing_trains_both_towers_exactly_as_without(tiny_towers, shapes, tmp_path):
    full = {"freeze_vision_model": False, "freeze_vision_projection": False, "max_steps": 3}
    plain = run(tiny_towers, shapes, tmp_path / "plain", **full)
    probe = CheckpointingFlags()
    arg_file = write_run_args(
        tiny_towers, shapes, tmp_path / "checkpointed", gradient_checkpointing=True, **full
    )
    checkpointed = run_training(*parse_train_args(arg_file), extra_callbacks=(probe,))
    assert probe.flags == {"text": True, "vision": True}
    assert checkpointed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert checkpointed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def shapes_dataset(checkpoint, shapes) -> ImageTextDataset:
    transform = ImageTransform.from_processor(load_processor(checkpoint))
    return ImageTextDataset(read_image_text_csv(shapes / "train.csv"), shapes / "images", transform)


def test_two_ranks_build_the_same_cache_as_one_process(tiny_model, tiny_checkpoint, shapes, tmp_path):
    dataset = shapes_dataset(tiny_checkpoint, shapes)
    expected, expected_valid = load_or_build_cache(tiny_model, dataset, tmp_path / "one", 8, 0, "cpu")
    barrier = threading.Barrier(2, timeout=60)
    results = {}

    def rank(number: int) -> None:
        shard = Shard(number, 2, barrier.wait)
        results[number] = load_or_build_cache(tiny_model, dataset, tmp_path / "two", 8, 0, "cpu", shard)

    threads = [threading.Thread(target=rank, args=(number,)) for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for features, valid in results.values():
        np.testing.assert_allclose(features, expected, atol=1e-3, rtol=1e-3)
        np.testing.assert_array_equal(valid, expected_valid)
    assert not list((tmp_path / "two").glob("*.part-*"))  # joined, then removed


def test_a_part_computed_before_an_interruption_is_not_computed_again(
    tiny_model, tiny_checkpoint, shapes, tmp_path, monkeypatch
):
    dataset = shapes_dataset(tiny_checkpoint, shapes)
    single = Shard(0, 1)
    import component.training.feature_cache as feature_cache

    computed = []
    original = feature_cache.compute_image_features
    monkeypatch.setattr(feature_cache, "compute_image_features",
                        lambda *args: computed.append(args[-1]) or original(*args))  # fmt: skip

    def interrupt_after_the_part():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_or_build_cache(tiny_model, dataset, tmp_path, 8, 0, "cpu", Shard(0, 1, interrupt_after_the_part))
    assert len(list(tmp_path.glob("*.part-0-of-1.npz"))) == 1 and not list(tmp_path.glob("*.json"))
    features, valid = load_or_build_cache(tiny_model, dataset, tmp_path, 8, 0, "cpu", single)
    assert len(computed) == 1  # the second call joined the saved part
    assert features.shape == (len(dataset), tiny_model.config.projection_dim) and valid.all()


def test_a_batch_smaller_than_the_accumulation_steps_is_split_without_empty_chunks(tiny_checkpoint, shapes):
    batch = batch_of(tiny_checkpoint, shapes, size=2)  # an epoch's short last batch, with K = 4
    micro_batches = split_batch(batch, 4)
    assert [len(chunk["input_ids"]) for chunk in micro_batches] == [1, 1]
    model = no_dropout_model(tiny_checkpoint)
    loss = gradient_cached_backward(model, model.logit_scale, micro_batches, loss_scale=1.0)
    assert torch.isfinite(loss)
