"""The contrastive losses over image-text pairs, chosen by name, with global negatives across ranks.

Each loss is a pure function: L2-normalised embeddings of this rank's rows and the model's scales
in, a scalar out. Under torchrun every rank's rows meet every other rank's, through a gather that
keeps gradients, so averaging gradients over ranks (as DDP does) gives exactly the gradient of the
loss over the global batch. Adding a loss is one function here and one entry in `LOSSES`.
"""

import math
from collections.abc import Callable

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


def _check_pairs(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, same_caption: torch.Tensor | None = None
) -> None:
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}"
        )
    global_batch = image_embeds.shape[0] * world_size()
    if same_caption is not None and same_caption.shape != (image_embeds.shape[0], global_batch):
        raise ValueError(
            f"same_caption must be [batch, global batch] = [{image_embeds.shape[0]}, {global_batch}], "
            f"got {list(same_caption.shape)}"
        )


def _own_pairs(batch: int, offset: int, global_batch: int, device: torch.device) -> torch.Tensor:
    """[batch, global batch] bool, True where column j holds row i's own pair (j = offset + i)."""
    columns = torch.arange(global_batch, device=device)
    return columns.unsqueeze(0) == torch.arange(offset, offset + batch, device=device).unsqueeze(1)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    same_caption: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i of each input is a matching pair.

    Args:
        image_embeds: L2-normalised image embeddings of this rank, [batch, dim].
        text_embeds: L2-normalised text embeddings of this rank, [batch, dim].
        logit_scale: log of the inverse temperature, clamped to at most ln(100).
        logit_bias: not used by this loss (a softmax ignores a constant); accepted so that every
            loss takes the same arguments.
        same_caption: optional [batch, global batch] bool, True where row i's caption equals global
            row j's. Such pairs (other than row i's own) are left out of both softmaxes: an image
            whose caption is the same text is not a negative (`dedupe_captions_in_batch`).

    When `torch.distributed` runs with several ranks, each rank's rows are contrasted
    against the whole global batch.
    """
    _check_pairs(image_embeds, text_embeds, same_caption)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    all_image_embeds, offset = gather_with_grad(image_embeds)
    all_text_embeds, _ = gather_with_grad(text_embeds)
    labels = torch.arange(offset, offset + image_embeds.shape[0], device=image_embeds.device)
    logits_per_image = scale * image_embeds @ all_text_embeds.T  # [batch, global batch]
    logits_per_text = scale * text_embeds @ all_image_embeds.T  # [batch, global batch]
    dtype = torch.promote_types(logits_per_image.dtype, torch.float32)  # no half-precision softmax
    logits_per_image, logits_per_text = logits_per_image.to(dtype), logits_per_text.to(dtype)
    if same_caption is not None:
        # Caption equality is symmetric, so one mask serves both directions.
        own = _own_pairs(len(labels), offset, logits_per_image.shape[1], logits_per_image.device)
        duplicates = same_caption.to(logits_per_image.device) & ~own
        logits_per_image = logits_per_image.masked_fill(duplicates, -math.inf)
        logits_per_text = logits_per_text.masked_fill(duplicates, -math.inf)
    image_loss = F.cross_entropy(logits_per_image, labels)
    text_loss = F.cross_entropy(logits_per_text, labels)
    return (image_loss + text_loss) / 2


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    same_caption: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    The sum over every image-text pair of -log sigmoid(z * (exp(logit_scale) * x_i . y_j + logit_bias)),
    z = +1 for a matching pair and -1 otherwise, divided by the number of images (open_clip's
    normalisation). The scale is not clamped. Under torchrun this rank's images meet the texts of
    every rank, so the mean over ranks is the loss of one process over the global batch.

    Args:
        image_embeds: L2-normalised image embeddings of this rank, [batch, dim].
        text_embeds: L2-normalised text embeddings of this rank, [batch, dim].
        logit_scale: log of the scale, a scalar.
        logit_bias: the learnt bias, a scalar (SigLIP starts it at -10).
        same_caption: optional [batch, global batch] bool, True where row i's caption equals global
            row j's. Such pairs (other than row i's own) are left out of the sum: image j does fit
            caption i, so it is no negative, and row i's own pair already asks for the match. Left
            out rather than counted as matches: on class-name captions (16 classes, batch 128, 16
            seeds), counted as matches they left held-out accuracy about 4 points behind plain
            SigLIP after 80 steps; left out, it was level with or ahead of plain SigLIP.
    """
    _check_pairs(image_embeds, text_embeds, same_caption)
    if logit_bias is None:
        raise ValueError("the siglip loss needs the model's logit_bias")
    all_text_embeds, offset = gather_with_grad(text_embeds)
    dtype = torch.promote_types(image_embeds.dtype, torch.float32)  # no half-precision log-sigmoid
    logits = logit_scale.exp() * image_embeds.to(dtype) @ all_text_embeds.to(dtype).T + logit_bias
    own = _own_pairs(image_embeds.shape[0], offset, logits.shape[1], logits.device)
    signs = torch.where(own, 1.0, -1.0).to(dtype)  # z, [batch, global batch]
    terms = -F.logsigmoid(signs * logits)
    if same_caption is not None:
        terms = terms.masked_fill(same_caption.to(logits.device) & ~own, 0.0)
    return terms.sum() / image_embeds.shape[0]


LossFunction = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFunction] = {"clip": contrastive_loss, "siglip": siglip_loss}
# The scales a model starts with when it is first trained with SigLIP (open_clip's initialisation).
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def get_loss(name: str) -> LossFunction:
    """The loss function called `name` ("clip" or "siglip")."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
