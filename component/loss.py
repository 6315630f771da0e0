"""Symmetric contrastive (InfoNCE) loss over image-text pairs, with global negatives across ranks."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the inverse temperature at 100


def world_size() -> int:
    """The processes of the initialised process group, or 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local rows."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, features)
        return torch.cat(gathered, dim=0)  # [world * batch, dim]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # Each rank's loss depends on every rank's rows; sum those gradients, keep our rows.
        grad = grad_output.contiguous()
        dist.all_reduce(grad)
        batch = grad.shape[0] // dist.get_world_size()
        start = dist.get_rank() * batch
        return grad[start : start + batch]


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `features` from every rank, keeping the autograd graph.

    Returns the global tensor [world * batch, dim] and the row offset of this rank's rows.
    Without an initialised process group of more than one rank it returns `features` unchanged.
    """
    if world_size() == 1:
        return features, 0
    # Summing gradients into the local rows means that averaging gradients over ranks,
    # as DDP does, gives exactly the gradient of the loss on the global batch.
    return _AllGatherWithGrad.apply(features.contiguous()), dist.get_rank() * features.shape[0]


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i of each input is a matching pair.

    Args:
        image_embeds: L2-normalised image embeddings of this rank, [batch, dim].
        text_embeds: L2-normalised text embeddings of this rank, [batch, dim].
        logit_scale: log of the inverse temperature, clamped to at most ln(100).

    When `torch.distributed` runs with several ranks, each rank's rows are contrasted
    against the whole global batch.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}"
        )
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    all_image_embeds, offset = gather_with_grad(image_embeds)
    all_text_embeds, _ = gather_with_grad(text_embeds)
    labels = torch.arange(offset, offset + image_embeds.shape[0], device=image_embeds.device)
    logits_per_image = scale * image_embeds @ all_text_embeds.T  # [batch, global batch]
    logits_per_text = scale * text_embeds @ all_image_embeds.T  # [batch, global batch]
    dtype = torch.promote_types(logits_per_image.dtype, torch.float32)  # no half-precision softmax
    image_loss = F.cross_entropy(logits_per_image.to(dtype), labels)
    text_loss = F.cross_entropy(logits_per_text.to(dtype), labels)
    return (image_loss + text_loss) / 2
