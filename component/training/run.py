"""One training run, step by step: build, load data, lock towers, train, evaluate, save."""

import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments, set_seed

from component.loss import world_size
from component.model import BertCLIPModel
from component.processor import ImageTransform, build_processor, check_tokenizer_fits, load_processor
from component.training.arguments import ArgumentError, DataArguments, ModelArguments, TowerArguments
from component.training.collator import ImageTextCollator
from component.training.feature_cache import (
    CachedImageTextDataset,
    Shard,
    image_tower_hash,
    load_or_build_cache,
)
from component.training.freezing import apply_tower_locks
from component.training.loaders import (
    StreamPositionCallback,
    build_dataset,
    check_same_shards,
)
from component.training.losses import prepare_model_for_loss, warn_about_duplicate_captions_in
from component.training.model_card import model_card, write_model_card
from component.training.plot import write_training_plot
from component.training.run_checks import check_data_sizes, check_max_seq_length
from component.training.run_output import (
    ARGS_FILE,
    ArgumentsRecordCallback,
    RunInterrupted,
    arguments_record,
    changed_arguments,
    finished_run,
    mark_finished,
    output_dir_lock,
    save_final_model,
    stop_when_disk_full,
)
from component.training.shards import ShardStream
from component.training.trainer import (
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
PLOT_FILE = "training_curves.png"


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
        source = model_args.text_pretrain_path
        model = BertCLIPModel.from_vision_text_pretrained(
            model_args.clip_pretrain_path, model_args.text_pretrain_path, text_pooling=model_args.text_pooling
        )
        processor = build_processor(model_args.clip_pretrain_path, model_args.text_pretrain_path)
    check_tokenizer_fits(processor.tokenizer, model, source)
    return model, processor


def build_datasets(
    data_args: DataArguments, transform: ImageTransform, training_args: TrainingArguments, stream: bool = True
):
    """Training and (optional) test datasets: CSV rows, or webdataset shards (loaders.build_dataset);
    training shards are streamed unless `stream` is False (cached image features need an index)."""
    train = build_dataset(data_args.train_file, data_args, transform, training_args, stream=stream)
    test = None
    if data_args.test_file:
        test = build_dataset(data_args.test_file, data_args, transform, training_args, stream=False)
    logger.info(f"{len(train)} training samples" + (f", {len(test)} test samples" if test else ""))
    return train, test


def check_sizes(train_dataset, training_args: TrainingArguments) -> None:
    """run_checks' data-size checks; a stream yields whole batches on every rank by construction."""
    if not isinstance(train_dataset, ShardStream):
        check_data_sizes(train_dataset, training_args)


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
    tower_hash = image_tower_hash(model)  # once: it reads every weight of the image tower
    cached = []
    for dataset in (train_dataset, test_dataset):
        if dataset is None:
            cached.append(None)
            continue
        features, valid = load_or_build_cache(
            model, dataset, cache_dir, batch_size, training_args.dataloader_num_workers,
            training_args.device, shard, tower_hash,
        )  # fmt: skip
        cached.append(CachedImageTextDataset(dataset.source, features, valid))
    return tuple(cached)


def build_callbacks(tower_args: TowerArguments, arguments: dict, train_dataset=None) -> list:
    """The toolkit's callbacks; the arguments record (and a stream's shard list) is written into a
    checkpoint before its marker."""
    callbacks = [LogitScaleClampCallback(), ArgumentsRecordCallback(arguments)]
    if isinstance(train_dataset, ShardStream):
        callbacks.append(StreamPositionCallback(train_dataset))
    callbacks.append(CheckpointMarkerCallback())
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
    resume_command: str | None = None,
) -> dict:
    """Train, evaluate and save; re-running the same arguments resumes from the newest complete checkpoint,
    and re-running a finished run changes nothing.

    resume_command: the command line that started the run, named when Ctrl-C interrupts it.
    """
    check_one_process_per_gpu(training_args)
    with output_dir_lock(training_args):  # before the model loads: a bad output_dir fails at once
        finished = finished_run(training_args)
        if finished is not None:
            if training_args.process_index == 0:
                print(f"{training_args.output_dir}: this run has already finished (step "
                      f"{finished['global_step']}); nothing to do. To train further raise max_steps "
                      "or num_train_epochs; to train again choose a new output_dir", flush=True)  # fmt: skip
            return finished
        try:
            return train_evaluate_save(model_args, data_args, tower_args, training_args, extra_callbacks)
        except KeyboardInterrupt:
            newest = newest_complete_checkpoint(training_args.output_dir) or "none yet"
            command = f"`{resume_command}`" if resume_command else "the same command"
            raise RunInterrupted(
                f"interrupted; newest complete checkpoint: {newest}; re-run {command} to resume"
            ) from None


def load_data(model, transform: ImageTransform, data_args, tower_args, training_args) -> tuple:
    """The training and test datasets (cached image features where asked), checked against the run,
    and their row counts for the model card."""
    stream = not tower_args.cache_image_features  # cached features need an index of the shards
    train_dataset, test_dataset = build_datasets(data_args, transform, training_args, stream)
    check_sizes(train_dataset, training_args)
    if training_args.process_index == 0:
        warn_about_duplicate_captions_in(
            train_dataset, data_args.train_file, tower_args.dedupe_captions_in_batch
        )
    row_counts = {data_args.train_file: len(train_dataset)}
    if test_dataset is not None:
        row_counts[data_args.test_file] = len(test_dataset)
    if tower_args.cache_image_features:
        train_dataset, test_dataset = cache_image_features(model, train_dataset, test_dataset, training_args)
    if test_dataset is not None and training_args.eval_strategy == "no":
        logger.info("a test_file is given: it is evaluated once at the end (set eval_strategy for more)")
    return train_dataset, test_dataset, row_counts


def train_evaluate_save(
    model_args: ModelArguments,
    data_args: DataArguments,
    tower_args: TowerArguments,
    training_args: TrainingArguments,
    extra_callbacks: tuple = (),
) -> dict:
    """The run itself, in the output directory the caller has locked."""
    # 1. Model, processor and data; seeded first so that new weights (the text projection) repeat.
    set_seed(training_args.seed)
    share_cpu_with_workers(training_args)
    model, processor = build_model_and_processor(model_args)
    prepare_model_for_loss(model, tower_args.loss)  # a SigLIP start gets its bias before the optimizer
    check_max_seq_length(data_args.max_seq_length, model.config)
    transform = ImageTransform.from_processor(processor)
    train_dataset, test_dataset, row_counts = load_data(
        model, transform, data_args, tower_args, training_args
    )

    # 2. Which towers train.
    apply_tower_locks(model, tower_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"trainable parameters: {trainable:,} of {model.num_parameters():,}")

    # 3. Train, resuming when an earlier run of this command left a checkpoint.
    arguments = arguments_record(model_args, data_args, tower_args, training_args)
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
        callbacks=[*build_callbacks(tower_args, arguments, train_dataset), *extra_callbacks],
        tower_args=tower_args,
        bad_image_tracker=tracker,
    )
    train_metrics = train(trainer, arguments)
    train_metrics["train_bad_images"] = tracker.bad

    # 4. Save the final model whole, then the metrics, the curves and the model card.
    with stop_when_disk_full(training_args.output_dir, "saving the final model"):
        save_final_model(trainer, training_args.output_dir, {ARGS_FILE: arguments})
    eval_metrics = trainer.evaluate() if test_dataset is not None else None
    with stop_when_disk_full(training_args.output_dir, "saving the run's records"):
        save_records(trainer, arguments, row_counts, train_metrics, eval_metrics)
    if trainer.is_world_process_zero():
        print(log_final_summary(train_metrics, eval_metrics), flush=True)
        if "resumed_from_checkpoint" in train_metrics:
            print(resume_summary(train_metrics, trainer.state.global_step), flush=True)
    return {**train_metrics, **(eval_metrics or {})}


def resume_point(training_args: TrainingArguments) -> tuple[str | None, int]:
    """The checkpoint to resume from (the one asked for, else the newest complete one) and its step."""
    resume = training_args.resume_from_checkpoint or newest_complete_checkpoint(training_args.output_dir)
    if not resume:
        return None, 0
    state = Path(resume) / "trainer_state.json"
    step = json.loads(state.read_text())["global_step"] if state.is_file() else 0
    return str(resume), step


def train(trainer: CLIPTrainer, arguments: dict) -> dict:
    """trainer.train(), resumed where a checkpoint exists; the metrics say where it resumed.

    A full disk while saving a checkpoint stops with one line; complete checkpoints are kept.
    """
    output_dir = trainer.args.output_dir
    resume, resumed_at = resume_point(trainer.args)
    if resume:
        check_same_shards(resume, trainer.train_dataset)
        logger.warning(f"resuming from {resume} (step {resumed_at})")
        for change in changed_arguments(resume, arguments):
            logger.warning(f"argument changed since {Path(resume).name}: {change}")
    with stop_when_disk_full(output_dir, "training (saving a checkpoint)"):
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if resume:
        metrics.update(resumed_from_checkpoint=resume, resumed_at_step=resumed_at)
        if trainer.state.global_step == resumed_at:
            metrics.pop("train_loss", None)  # no step was trained: 0.0 would be a made-up loss
    return metrics


def resume_summary(train_metrics: dict, global_step: int) -> str:
    """The summary line of a resumed run: where it resumed, and that train_loss covers only the rest."""
    resumed_at = train_metrics["resumed_at_step"]
    if global_step == resumed_at:
        return f"resumed from {train_metrics['resumed_from_checkpoint']} at step {resumed_at}: no steps left"
    return (
        f"resumed from {train_metrics['resumed_from_checkpoint']} at step {resumed_at}: "
        f"train_loss covers steps {resumed_at + 1}-{global_step} only"
    )


def save_records(trainer, arguments: dict, row_counts: dict, train_metrics: dict, eval_metrics) -> None:
    """Metrics, trainer state, the curves (PNG) and the model card, then the marker that the run finished."""
    trainer.save_metrics("train", train_metrics)
    if eval_metrics is not None:
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    write_training_plot(output_dir / PLOT_FILE, trainer.state.log_history)
    metrics = {**train_metrics, **(eval_metrics or {})}
    model_config = trainer.accelerator.unwrap_model(trainer.model).config
    write_model_card(output_dir, model_card(arguments, model_config, row_counts, metrics, world_size()))
    mark_finished(trainer.args, trainer.state.global_step)
