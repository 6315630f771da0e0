"""Locking and unlocking the towers, and the optimizer's parameter groups."""

import logging

from torch import nn

logger = logging.getLogger(__name__)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def lock_vision_tower(model, lock_projection: bool = True) -> None:
    """LiT: freeze the image tower (and by default its projection, fixing the image embedding space)."""
    set_trainable(model.vision_model, False)
    if lock_projection:
        set_trainable(model.visual_projection, False)


def unlock_vision_tower(model) -> None:
    """Chinese-CLIP's second stage: the image tower and its projection train again."""
    set_trainable(model.vision_model, True)
    set_trainable(model.visual_projection, True)


def lock_text_tower(model) -> None:
    """Freeze BERT; the text projection keeps training."""
    set_trainable(model.text_model, False)


def apply_tower_locks(model, tower_args) -> None:
    """Lock what the `TowerArguments` ask for; everything else trains."""
    set_trainable(model, True)
    if tower_args.freeze_vision_model:
        lock_vision_tower(model, lock_projection=tower_args.freeze_vision_projection)
    elif tower_args.freeze_vision_projection:
        set_trainable(model.visual_projection, False)
    if tower_args.freeze_text_model:
        lock_text_tower(model)


def is_no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases, norms, embeddings, the logit scale and the logit bias are not weight-decayed."""
    lowered = name.lower()
    return (
        parameter.ndim < 2
        or "norm" in lowered
        or "embedding" in lowered
        or name.endswith("class_embedding")
        or name in ("logit_scale", "logit_bias")
    )


def is_image_side(name: str) -> bool:
    return name.startswith(("vision_model.", "visual_projection."))


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    vision_learning_rate: float | None = None,
    include_locked_vision: bool = False,
) -> list[dict]:
    """AdamW groups: (image tower | the rest) x (decay | no decay).

    With `include_locked_vision`, the locked image tower is in the optimizer from the start (it
    gets no gradient, so no update) and trains with `vision_learning_rate` once unlocked.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad and not (include_locked_vision and is_image_side(name)):
            continue
        vision = name.startswith("vision_model.")  # the projection trains at the main rate
        groups.setdefault((vision, is_no_decay(name, parameter)), []).append(parameter)
    vision_lr = learning_rate / 10 if vision_learning_rate is None else vision_learning_rate
    return [
        {
            "params": params,
            "lr": vision_lr if vision else learning_rate,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'vision' if vision else 'text'}{'_no_decay' if no_decay else ''}",
        }
        for (vision, no_decay), params in sorted(groups.items())
    ]
