"""Start-up checks that need the model or the data, not only the arguments.

Each refuses (or repairs, with a warning) a run that would otherwise crash late or train nothing,
and names the numbers and what to change.
"""

import logging

from component.training.arguments import ArgumentError
from component.training.dataset import DataError

logger = logging.getLogger(__name__)


def check_max_seq_length(max_seq_length: int, model_config) -> None:
    """Refuse captions longer than the text tower has position embeddings for: the first caption
    that long would crash the run with an index error."""
    positions = model_config.text_config.max_position_embeddings
    if max_seq_length > positions:
        raise ArgumentError(
            f"max_seq_length {max_seq_length} is more than the text tower's max_position_embeddings "
            f"{positions}; set max_seq_length to at most {positions}"
        )


def check_drop_last_fits(train_rows: int, source: str, training_args) -> None:
    """Refuse dataloader_drop_last when the training set does not fill one batch on every process:
    the epoch would have no batch at all and the Trainer would fail with a traceback."""
    batch = training_args.per_device_train_batch_size
    processes = training_args.world_size
    if training_args.dataloader_drop_last and train_rows < batch * processes:
        per_process = f" on each of {processes} processes" if processes > 1 else ""
        raise ArgumentError(
            f"dataloader_drop_last with per_device_train_batch_size {batch}{per_process} needs at "
            f"least {batch * processes} training rows, but {source} has {train_rows}; lower "
            f"per_device_train_batch_size to at most {train_rows // processes} or set "
            "dataloader_drop_last to false"
        )


def avoid_lone_last_batch(train_rows: int, source: str, training_args) -> None:
    """Drop an epoch's last batch when it would hold a single row, and say so.

    A contrastive loss over one pair is 0 whatever the model, so that step trains nothing (and
    still moves the optimizer's state). Under torchrun each process's batch is contrasted with
    the whole global batch, which is never a single row then.
    """
    batch = training_args.per_device_train_batch_size
    if training_args.world_size > 1 or training_args.dataloader_drop_last:
        return
    if train_rows < 2:
        raise DataError(
            f"{source} has {train_rows} usable row; contrastive training needs at least 2 image-text pairs"
        )
    if train_rows % batch == 1:
        logger.warning(
            f"{source} has {train_rows} rows and per_device_train_batch_size is {batch}: each epoch's "
            "last batch would hold 1 row, whose contrastive loss is 0 and trains nothing; that row is "
            "dropped each epoch (dataloader_drop_last is set). Change the batch size to keep it."
        )
        training_args.dataloader_drop_last = True


def check_data_sizes(train_dataset, training_args) -> None:
    """The data-size checks of a run, once its training set is built."""
    rows, source = len(train_dataset), train_dataset.source.name
    check_drop_last_fits(rows, source, training_args)
    avoid_lone_last_batch(rows, source, training_args)
