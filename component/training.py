"""One training run, step by step: build, load data, lock towers, train, evaluate, save."""

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments, set_seed

from component.argument import ArgumentError, DataArguments, ModelArguments, TowerArguments
from component.collator import ImageTextCollator
from component.dataset import ImageTextDataset, read_image_text_csv
from component.feature_cache import CachedImageTextDataset, Shard, load_or_build_cache
from component.freezing import apply_tower_locks
from component.loss import world_size
from component.model import BertCLIPModel
from component.processor import ImageTransform, build_processor, check_tokenizer_fits, load_processor
from component.trainer import (
    BadImageTracker,
    CheckpointMarkerCallback,
    CLIPTrainer,
    LogitScaleClampCallback,
    VisionUnlockCallback,
    log_final_summary,
    min_samples_before_bad_image_check,
    newest_complete_checkpoint,
)

logger = logging.getLogger(__name__)

CACHE_BARRIER_TIMEOUT = timedelta(hours=48)  # the slowest process's share of the cache pass


def share_cpu_with_workers(training_args: TrainingArguments) -> None:
    """On a CPU run, leave the DataLoader workers their cores: torch's default takes them all."""
    if training_args.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores - training_args.dataloader_num_workers))


def check_one_process_per_gpu(training_args: TrainingArguments) -> None:
    """Refuse one process driving several GPUs: the Trainer would use DataParallel, and each GPU's
    loss would see only its slice of the batch as negatives."""
    if training_args.n_gpu > 1:
        raise ArgumentError(
            f"{training_args.n_gpu} GPUs are visible to one process; launch one process per GPU with "
            f"`torchrun --nproc_per_node {training_args.n_gpu} train_clip.py ...`, or set "
            "CUDA_VISIBLE_DEVICES to a single GPU"
        )


def build_model_and_processor(model_args: ModelArguments):
    """A BertCLIP model and its processor, from one checkpoint or from a CLIP and a BERT checkpoint."""
    if model_args.model_name_or_path:
        source = model_args.model_name_or_path
        model = BertCLIPModel.from_pretrained(source)
        processor = load_processor(source)
    else:
        source = model_args.bert_pretrain_path
        model = BertCLIPModel.from_vision_text_pretrained(
            model_args.clip_pretrain_path, model_args.bert_pretrain_path, text_pooling=model_args.text_pooling
        )
        processor = build_processor(model_args.clip_pretrain_path, model_args.bert_pretrain_path)
    check_tokenizer_fits(processor.tokenizer, model, source)
    return model, processor


def build_datasets(data_args: DataArguments, transform: ImageTransform):
    """Training and (optional) test datasets over the CSV rows."""
    train_rows = read_image_text_csv(data_args.train_file)
    train = ImageTextDataset(train_rows, data_args.image_path, transform, draft=data_args.draft_decode)
    test = None
    if data_args.test_file:
        test_rows = read_image_text_csv(data_args.test_file)
        test = ImageTextDataset(test_rows, data_args.image_path, transform, draft=data_args.draft_decode)
    logger.info(f"{len(train)} training rows" + (f", {len(test)} test rows" if test else ""))
    return train, test


def cache_shard() -> Shard:
    """This process's share of the feature-cache work under torchrun, with a barrier that waits
    as long as the cache pass takes (the training group's ddp_timeout would end it at 30 minutes)."""
    if world_size() == 1:
        return Shard()
    group = dist.new_group(backend="gloo", timeout=CACHE_BARRIER_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size(), lambda: dist.barrier(group=group))


def cache_image_features(model, train_dataset, test_dataset, training_args: TrainingArguments):
    """Swap pixel datasets for cached-feature datasets; under torchrun each process computes a share."""
    cache_dir = Path(training_args.output_dir) / "image_feature_cache"
    model.to(training_args.device)
    shard = cache_shard()
    batch_size = max(training_args.per_device_eval_batch_size, training_args.per_device_train_batch_size)
    cached = []
    for dataset in (train_dataset, test_dataset):
        if dataset is None:
            cached.append(None)
            continue
        features, valid = load_or_build_cache(
            model, dataset, cache_dir, batch_size, training_args.dataloader_num_workers,
            training_args.device, shard,
        )  # fmt: skip
        cached.append(CachedImageTextDataset(dataset.rows, features, valid))
    return tuple(cached)


def build_callbacks(tower_args: TowerArguments) -> list:
    callbacks = [LogitScaleClampCallback(), CheckpointMarkerCallback()]
    if tower_args.unlock_vision_at is not None:
        patience = tower_args.unlock_patience if tower_args.unlock_vision_at == "plateau" else None
        callbacks.append(VisionUnlockCallback(unlock_step=tower_args.unlock_step, plateau_patience=patience))
    return callbacks


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    tower_args: TowerArguments,
    training_args: TrainingArguments,
    extra_callbacks: tuple = (),
) -> dict:
    """Train, evaluate and save; re-running the same arguments resumes from the newest complete checkpoint."""
    # 1. Model, processor and data; seeded first so that new weights (the text projection) repeat.
    check_one_process_per_gpu(training_args)
    set_seed(training_args.seed)
    share_cpu_with_workers(training_args)
    model, processor = build_model_and_processor(model_args)
    transform = ImageTransform.from_processor(processor)
    train_dataset, test_dataset = build_datasets(data_args, transform)
    if tower_args.cache_image_features:
        train_dataset, test_dataset = cache_image_features(model, train_dataset, test_dataset, training_args)
    if test_dataset is not None and training_args.eval_strategy == "no":
        logger.info("a test_file is given: it is evaluated once at the end (set eval_strategy for more)")

    # 2. Which towers train.
    apply_tower_locks(model, tower_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"trainable parameters: {trainable:,} of {model.num_parameters():,}")

    # 3. Train, resuming when an earlier run of this command left a checkpoint.
    tracker = BadImageTracker(
        data_args.max_bad_image_fraction, min_samples_before_bad_image_check(len(train_dataset))
    )
    trainer = CLIPTrainer(
        model=model,
        args=training_args,
        data_collator=ImageTextCollator(processor, transform, data_args.max_seq_length),
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        processing_class=processor,
        callbacks=[*build_callbacks(tower_args), *extra_callbacks],
        tower_args=tower_args,
        bad_image_tracker=tracker,
    )
    resume = training_args.resume_from_checkpoint or newest_complete_checkpoint(training_args.output_dir)
    if resume:
        logger.warning(f"resuming from {resume}")
    train_result = trainer.train(resume_from_checkpoint=resume)

    # 4. Save the final model, processor and metrics.
    trainer.save_model(training_args.output_dir)
    train_metrics = {**train_result.metrics, "train_bad_images": tracker.bad}
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    eval_metrics = None
    if test_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():
        print(log_final_summary(train_metrics, eval_metrics), flush=True)
    return {**train_metrics, **(eval_metrics or {})}
