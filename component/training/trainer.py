"""The Hugging Face Trainer, taught contrastive loss, retrieval evaluation and tower unlocking."""

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from component.evaluation.metrics import trivial_recall_note
from component.loss import MAX_LOGIT_SCALE, get_loss, world_size
from component.training.dataset import BadImageError
from component.training.freezing import parameter_groups, unlock_vision_tower
from component.training.grad_cache import gradient_cached_backward, split_batch
from component.training.loaders import DataLoaderMixin, dataset_retrieval_metrics
from component.training.losses import batch_loss, prepare_model_for_loss, same_caption_mask
from datatools.atomic import write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"


class BadImageTracker:
    """Counts replaced images, logs the first few and then every `log_every`-th, enforces a ceiling.

    The ceiling is judged once `min_samples` have been seen, and at the end of a run by `check`
    whatever its length, so a run shorter than `min_samples` cannot finish on bad data unnoticed.
    """

    def __init__(self, max_fraction: float, min_samples: int, log_first: int = 10, log_every: int = 1000,
                 source: str | None = None):  # fmt: skip
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.log_first = log_first
        self.log_every = log_every
        self.source = source
        self.samples = 0
        self.bad = 0

    def update(self, batch_size: int, bad_images: list[str]) -> None:
        self.samples += batch_size
        self.log(bad_images)
        if self.samples >= self.min_samples:
            self.check()

    def log(self, bad_images: list[str]) -> None:
        """Count and log (the first few, then every `log_every`-th) bad-image messages."""
        where = f" in {self.source}" if self.source else ""
        for message in bad_images:
            self.bad += 1
            if self.bad <= self.log_first or self.bad % self.log_every == 0:
                logger.warning(f"bad image #{self.bad}{where} replaced by another row: {message}")

    def check(self, bad: int | None = None, samples: int | None = None) -> None:
        """Raise BadImageError when more than `max_fraction` of the samples had a bad image.

        `bad` and `samples` default to this tracker's counts (pass totals over all ranks).
        """
        bad = self.bad if bad is None else bad
        samples = self.samples if samples is None else samples
        if samples and bad > self.max_fraction * samples:
            where = f"{self.source}: " if self.source else ""
            raise BadImageError(
                f"{where}{bad} of {samples} images failed to load ({bad / samples:.1%}), "
                f"more than max_bad_image_fraction={self.max_fraction}. Run filter_data.py on the CSV, "
                "or raise max_bad_image_fraction in the arg file."
            )


class CLIPTrainer(DataLoaderMixin, Trainer):
    """Trainer with the loss chosen by name, whole-test-set retrieval metrics and per-tower learning rates."""

    def __init__(self, *args, tower_args, bad_image_tracker: BadImageTracker, **kwargs):
        # Before the Trainer places the model and long before the optimizer: a SigLIP bias must be
        # a parameter by then (and a checkpoint being resumed restores its value).
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            prepare_model_for_loss(model, tower_args.loss)
        super().__init__(*args, **kwargs)
        self.tower_args = tower_args
        self.bad_image_tracker = bad_image_tracker
        if bad_image_tracker.source is None and hasattr(self.train_dataset, "source"):
            bad_image_tracker.source = self.train_dataset.source.name
        self._warned_trivial_recall = False
        # The contrastive loss is a mean over the batch; let the Trainer scale it for accumulation.
        self.model_accepts_loss_kwargs = False

    def _model_inputs(self, inputs: dict, training: bool) -> tuple[dict, torch.Tensor | None, list[str]]:
        """The model's inputs from a batch already on the device, the sample indices and the
        bad-image messages; a training batch's bad images are counted against the ceiling."""
        inputs, sample_index, bad_images = self.data_collator.model_inputs(inputs)
        if training:
            self.bad_image_tracker.update(len(inputs["input_ids"]), bad_images)
        return inputs, sample_index, bad_images

    def train(self, *args, **kwargs):
        """Train, then judge the bad-image fraction over the whole run, however short it was."""
        result = super().train(*args, **kwargs)
        tracker = self.bad_image_tracker
        bad, samples = self._sum_over_ranks(tracker.bad, tracker.samples)
        tracker.check(bad, samples)
        return result

    def _sum_over_ranks(self, *counts: int) -> list[int]:
        """`counts` summed over all processes (every rank then takes the same decision)."""
        if world_size() == 1:
            return list(counts)
        totals = torch.tensor(counts, dtype=torch.long, device=self.args.device)
        dist.all_reduce(totals)
        return totals.tolist()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss named by `tower_args.loss`, on the model's embeddings and scales."""
        inputs, _, _ = self._model_inputs(inputs, training=model.training)
        loss, outputs = self._batch_loss(model, inputs)
        return (loss, outputs) if return_outputs else loss

    def _batch_loss(self, model, inputs: dict):
        return batch_loss(model, inputs, self.tower_args.loss, self.tower_args.dedupe_captions_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = parameter_groups(
                self.model,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                vision_learning_rate=self.tower_args.vision_learning_rate,
                include_locked_vision=self.tower_args.unlock_vision_at is not None,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.tower_args.contrastive_accumulation_steps > 1:
            loss = self._gradient_cached_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._sync_unlocked_vision_gradients()
        return loss

    def _gradient_cached_step(self, model, inputs) -> torch.Tensor:
        model.train()
        inputs, _, _ = self._model_inputs(self._prepare_inputs(inputs), training=True)
        micro_batches = split_batch(inputs, self.tower_args.contrastive_accumulation_steps)
        unwrapped = self.accelerator.unwrap_model(model)
        same_caption = None
        if self.tower_args.dedupe_captions_in_batch:  # over all K micro-batches, as the loss sees them
            same_caption = same_caption_mask(inputs["input_ids"], inputs.get("attention_mask"))
        return gradient_cached_backward(
            model,
            unwrapped.logit_scale,
            micro_batches,
            loss_scale=1.0 / self.current_gradient_accumulation_steps,
            backward=self.accelerator.backward,
            autocast=self.compute_loss_context_manager,
            no_sync=getattr(model, "no_sync", None),
            loss_function=get_loss(self.tower_args.loss),
            logit_bias=unwrapped.logit_bias,
            same_caption=same_caption,
        )

    def _sync_unlocked_vision_gradients(self) -> None:
        # DDP only synchronises parameters that were trainable when it wrapped the model; an image
        # tower unlocked later is averaged here. Averaging already-equal gradients changes nothing,
        # so this is also right for gradients DDP has synchronised.
        if world_size() == 1:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.tower_args.unlock_vision_at is None or not unwrapped.visual_projection.weight.requires_grad:
            return
        for parameter in (*unwrapped.vision_model.parameters(), unwrapped.visual_projection.weight):
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()

    def get_eval_dataloader(self, eval_dataset=None):
        # Every test row is scored: dataloader_drop_last is meant for training batches, and the
        # Trainer would apply it here too (dropping the whole test set when it is under one batch).
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """eval_loss plus image<->text recall@1/5/10 over the test rows whose image loaded.

        Also `eval_bad_images` (test images replaced because they failed to load; too many stop
        the run, as in training), `eval_images` and `eval_texts` (distinct images and captions scored).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        dataloader = self.get_eval_dataloader(dataset)
        source = getattr(getattr(dataset, "source", None), "name", None)
        bad_image_log = BadImageTracker(self.bad_image_tracker.max_fraction, 0, source=source)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        totals = {"loss": 0.0, "samples": 0}
        image_parts, text_parts, index_parts = [], [], []
        for batch in tqdm(
            dataloader, desc="evaluating", disable=not self.is_world_process_zero(), leave=False
        ):
            batch, sample_index, bad_images = self._model_inputs(self._prepare_inputs(batch), training=False)
            bad_image_log.log(bad_images)
            with self.accelerator.autocast():
                loss, outputs = self._batch_loss(model, batch)
            totals["loss"] += loss.item() * len(sample_index)
            totals["samples"] += len(sample_index)
            images, texts, indices = self.accelerator.gather_for_metrics(
                (outputs.image_embeds.float(), outputs.text_embeds.float(), sample_index)
            )
            image_parts.append(images.cpu())
            text_parts.append(texts.cpu())
            index_parts.append(indices.cpu())
        model.train(was_training)
        loss = torch.tensor([totals["loss"], totals["samples"]], device=self.args.device)
        loss = self.accelerator.reduce(loss, reduction="sum")
        metrics = {f"{metric_key_prefix}_loss": (loss[0] / loss[1]).item()}
        sample_index = torch.cat(index_parts)
        keep = first_occurrences(sample_index)
        bad = len(sample_index) - len(keep)
        if bad:
            logger.warning(f"{source}: {bad} of {len(sample_index)} test images failed to load; "
                           f"recall is over the other {len(keep)} rows")  # fmt: skip
        bad_image_log.check(bad, len(sample_index))
        recall = dataset_retrieval_metrics(
            dataset, torch.cat(image_parts)[keep], torch.cat(text_parts)[keep], sample_index[keep]
        )
        self._warn_if_recall_is_trivial(source, recall["images"], recall["texts"])
        recall["bad_images"] = bad
        metrics.update({f"{metric_key_prefix}_{name}": value for name, value in recall.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _warn_if_recall_is_trivial(self, source: str | None, n_images: int, n_texts: int) -> None:
        note = trivial_recall_note(n_images, n_texts)
        if note and not self._warned_trivial_recall:
            logger.warning(f"{source}: {note}")
            self._warned_trivial_recall = True  # once per run, not at every evaluation


def first_occurrences(sample_index: torch.Tensor) -> torch.Tensor:
    """Positions of the first sample of each row, in order.

    Every test row is requested once, so a row seen twice is a bad image's replacement: scoring
    it again would count one pair twice.
    """
    _, inverse = torch.unique(sample_index, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(sample_index), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(sample_index)), reduce="amin")
    return first.sort().values


class LogitScaleClampCallback(TrainerCallback):
    """Keep the learned logit scale at most ln(100) after every optimizer step, as CLIP does.

    Only for the softmax loss: a model with a logit bias trains with the sigmoid loss (see
    `prepare_model_for_loss`), whose scale SigLIP leaves unclamped.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if getattr(model, "logit_bias", None) is not None:
            return
        with torch.no_grad():
            model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


class VisionUnlockCallback(TrainerCallback, ExportableState):
    """Unlock the image tower at a fixed step, or when eval_mean_recall stops improving."""

    def __init__(self, unlock_step: int | None = None, plateau_patience: int | None = None):
        self.unlock_step = unlock_step
        self.plateau_patience = plateau_patience
        self.unlocked_at: int | None = None
        self.best_recall: float | None = None
        self.evaluations_since_best = 0

    def state(self) -> dict:
        return {
            "args": {"unlock_step": self.unlock_step, "plateau_patience": self.plateau_patience},
            "attributes": {
                "unlocked_at": self.unlocked_at,
                "best_recall": self.best_recall,
                "evaluations_since_best": self.evaluations_since_best,
            },
        }

    def unlock(self, model, state, reason: str) -> None:
        unlock_vision_tower(model)
        self.unlocked_at = state.global_step
        logger.warning(f"step {state.global_step}: unlocking the image tower ({reason})")
        state.log_history.append({"step": state.global_step, "vision_unlocked": reason})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):  # a resumed run: carry on where the checkpoint left off
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, value)
        if self.unlocked_at is not None:
            unlock_vision_tower(model)
            logger.warning(f"image tower unlocked since step {self.unlocked_at} (restored from checkpoint)")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if (
            self.unlocked_at is None
            and self.unlock_step is not None
            and state.global_step >= self.unlock_step
        ):
            self.unlock(model, state, f"unlock_vision_at={self.unlock_step}")

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        recall = (metrics or {}).get("eval_mean_recall")
        if self.plateau_patience is None or recall is None or self.unlocked_at is not None:
            return
        if self.best_recall is None or recall > self.best_recall:
            self.best_recall, self.evaluations_since_best = recall, 0
            return
        self.evaluations_since_best += 1
        if self.evaluations_since_best >= self.plateau_patience:
            best, patience = self.best_recall, self.plateau_patience
            reason = f"eval_mean_recall has not improved on {best:.4f} for {patience} evaluations"
            self.unlock(model, state, reason)


class CheckpointMarkerCallback(TrainerCallback):
    """Mark a checkpoint complete once every file of it is written, so a resume never picks a torn one."""

    def on_save(self, args, state, control, **kwargs):
        if world_size() > 1:
            dist.barrier()  # every rank has written its part (RNG state, optimizer shards)
        if not args.should_save:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            write_json_atomic(directory / CHECKPOINT_MARKER, {"global_step": state.global_step})


def newest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint with the highest step whose completion marker exists, or None."""
    candidates = []
    for directory in Path(output_dir).glob("checkpoint-*"):
        step = directory.name.removeprefix("checkpoint-")
        if step.isdigit() and (directory / CHECKPOINT_MARKER).is_file():
            candidates.append((int(step), directory))
    return str(max(candidates)[1]) if candidates else None


def min_samples_before_bad_image_check(dataset_size: int) -> int:
    """Judge the bad-image fraction only once a fair share of the data has been seen."""
    return max(1, min(dataset_size, 1000))


def log_final_summary(train_metrics: dict, eval_metrics: dict | None) -> str:
    """A short human-readable summary of the run's final metrics."""
    lines = [f"train_loss {train_metrics.get('train_loss', math.nan):.4f} "
             f"in {train_metrics.get('train_runtime', math.nan):.1f}s"]  # fmt: skip
    if eval_metrics:
        lines.append(
            f"eval_loss {eval_metrics['eval_loss']:.4f}, "
            f"eval_mean_recall {eval_metrics['eval_mean_recall']:.3f}"
        )
        lines.append(
            "recall@1/5/10  image->text "
            + " / ".join(f"{eval_metrics[f'eval_i2t_recall@{k}']:.3f}" for k in (1, 5, 10))
            + "  text->image "
            + " / ".join(f"{eval_metrics[f'eval_t2i_recall@{k}']:.3f}" for k in (1, 5, 10))
        )
    return "\n".join(lines)
