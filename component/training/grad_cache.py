"""Gradient caching: a loss over K micro-batches at the memory cost of one.

Pass 1 embeds every micro-batch without a graph and takes the loss over all K x B pairs, giving
the loss's gradient with respect to each embedding. Pass 2 re-embeds one micro-batch at a time
with a graph and back-propagates those cached embedding gradients. The parameter gradients are
those of a single K x B batch (Gao et al., "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup", 2021).
"""

import contextlib

import torch

from component.loss import LossFunction, contrastive_loss

EMBEDDING_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_features")


def split_batch(batch: dict, chunks: int) -> list[dict]:
    """Split the model inputs of a batch into `chunks` micro-batches along the first dimension;
    fewer when the batch has fewer rows (an epoch's last batch), so that none is empty."""
    inputs = {k: v for k, v in batch.items() if k in EMBEDDING_INPUTS and v is not None}
    chunks = min(chunks, len(next(iter(inputs.values()))))
    pieces = {k: torch.tensor_split(v, chunks) for k, v in inputs.items()}
    return [{k: pieces[k][i] for k in inputs} for i in range(chunks)]


class _RandomState:
    """Capture and replay the RNG, so both passes draw the same dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _embed(model, micro_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(**micro_batch)
    return outputs.image_embeds, outputs.text_embeds


def gradient_cached_backward(
    model, logit_scale: torch.nn.Parameter, micro_batches: list[dict], loss_scale: float,
    backward=None, autocast=contextlib.nullcontext, no_sync=None,
    loss_function: LossFunction = contrastive_loss, logit_bias: torch.nn.Parameter | None = None,
    same_caption: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Back-propagate the loss of all micro-batches together; returns the scaled loss.

    Args:
        model: the (possibly DDP-wrapped) model; its forward returns normalised embeddings.
        logit_scale: the model's logit-scale parameter.
        loss_scale: multiplies the loss (1 / gradient accumulation steps).
        backward: how to back-propagate (the accelerator's, for mixed precision); default tensor.backward.
        autocast: a context manager factory for the forward passes.
        no_sync: a context manager factory that defers DDP gradient reduction (all but the last chunk).
        loss_function: the chosen loss (`component.loss.get_loss`), called once over all K x B rows.
        logit_bias: the model's logit bias, or None; it gets its cached gradient like the scale.
        same_caption: the [K x B, global K x B] same-caption mask of the whole batch, or None.
    """
    backward = backward or (lambda tensor: tensor.backward())
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            states.append(_RandomState())
            with autocast():
                images, texts = _embed(model, micro_batch)
            image_parts.append(images.float())
            text_parts.append(texts.float())
    all_images = torch.cat(image_parts).requires_grad_()
    all_texts = torch.cat(text_parts).requires_grad_()
    scales = [p.detach().clone().requires_grad_() for p in (logit_scale, logit_bias) if p is not None]
    loss = loss_function(all_images, all_texts, *scales, same_caption=same_caption) * loss_scale
    loss.backward()  # only into the leaves above: no parameter is touched yet
    image_grads = torch.split(all_images.grad, [len(p) for p in image_parts])
    text_grads = torch.split(all_texts.grad, [len(p) for p in text_parts])
    rng_after = _RandomState()
    for i, micro_batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        states[i].restore()
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast():
                images, texts = _embed(model, micro_batch)
                surrogate = (images.float() * image_grads[i]).sum() + (texts.float() * text_grads[i]).sum()
                if last:  # the scale and bias once; a loss that ignores the bias leaves it no gradient
                    parameters = (p for p in (logit_scale, logit_bias) if p is not None)
                    for parameter, copy in zip(parameters, scales, strict=True):
                        if copy.grad is not None:
                            surrogate = surrogate + parameter * copy.grad
            backward(surrogate)
    rng_after.restore()
    return loss.detach()
