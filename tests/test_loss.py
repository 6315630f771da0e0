"""The losses against hand computations, and global negatives across 2 gloo ranks."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from component.loss import MAX_LOGIT_SCALE, contrastive_loss, get_loss, siglip_loss
from component.training.losses import same_caption_mask


def naive_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's loss written out term by term."""
    scale = math.exp(min(logit_scale, math.log(100)))
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        image_row = [scale * float(image_embeds[i] @ text_embeds[j]) for j in range(n)]
        text_row = [scale * float(text_embeds[i] @ image_embeds[j]) for j in range(n)]
        total += -image_row[i] + math.log(sum(math.exp(x) for x in image_row))
        total += -text_row[i] + math.log(sum(math.exp(x) for x in text_row))
    return total / (2 * n)


def naive_siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias):
    """SigLIP's loss written out pair by pair: -log sigmoid(z * logit), summed, over the image count."""
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = math.exp(logit_scale) * float(image_embeds[i] @ text_embeds[j]) + logit_bias
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total / n


def naive_masked_loss(image_embeds, text_embeds, logit_scale, same):
    """CLIP's loss with the same-caption pairs other than a row's own left out of both softmaxes."""
    scale = math.exp(logit_scale)
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        kept = [j for j in range(n) if j == i or not same[i][j]]
        image_row = {j: scale * float(image_embeds[i] @ text_embeds[j]) for j in kept}
        text_row = {j: scale * float(text_embeds[i] @ image_embeds[j]) for j in kept}
        total += -image_row[i] + math.log(sum(math.exp(x) for x in image_row.values()))
        total += -text_row[i] + math.log(sum(math.exp(x) for x in text_row.values()))
    return total / (2 * n)


def naive_masked_siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias, same):
    """SigLIP's loss with the same-caption pairs other than a row's own left out of the sum."""
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        for j in [j for j in range(n) if j == i or not same[i][j]]:
            logit = math.exp(logit_scale) * float(image_embeds[i] @ text_embeds[j]) + logit_bias
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total / n


CAPTIONS = [0, 1, 0, 2, 1, 0]  # rows 0, 2, 5 share a caption, and rows 1, 4


def caption_mask(captions):
    ids = torch.tensor(captions)
    return ids.unsqueeze(1) == ids.unsqueeze(0)


def random_embeds(n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)


def test_loss_matches_hand_computation():
    images, texts = random_embeds(5, 8, 0), random_embeds(5, 8, 1)
    loss = contrastive_loss(images, texts, torch.tensor(2.0, dtype=torch.float64))
    assert abs(loss.item() - naive_loss(images, texts, 2.0)) < 1e-6


def test_logit_scale_is_clamped_at_ln_100():
    images, texts = random_embeds(4, 8, 2), random_embeds(4, 8, 3)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(images, texts, scale)
    assert abs(loss.item() - naive_loss(images, texts, MAX_LOGIT_SCALE)) < 1e-6
    loss.backward()
    assert scale.grad.item() == 0.0  # beyond the cap the scale gets no gradient


def test_perfect_alignment_gives_low_loss():
    embeds = torch.eye(6, dtype=torch.float64)
    assert contrastive_loss(embeds, embeds, torch.tensor(MAX_LOGIT_SCALE)).item() < 1e-6


def test_siglip_loss_matches_hand_computation():
    images, texts = random_embeds(5, 8, 4), random_embeds(5, 8, 5)
    scale, bias = torch.tensor(1.7, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    loss = siglip_loss(images, texts, scale, bias)
    assert abs(loss.item() - naive_siglip_loss(images, texts, 1.7, -3.0)) < 1e-9


def test_siglip_scale_is_not_clamped():
    images, texts = random_embeds(4, 8, 6), random_embeds(4, 8, 7)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)  # beyond ln(100)
    loss = siglip_loss(images, texts, scale, torch.tensor(-10.0, dtype=torch.float64))
    assert abs(loss.item() - naive_siglip_loss(images, texts, 6.0, -10.0)) < 1e-9
    loss.backward()
    assert scale.grad.item() != 0.0


def test_clip_loss_leaves_same_caption_pairs_out_of_both_softmaxes():
    images, texts = random_embeds(6, 8, 8), random_embeds(6, 8, 9)
    same = caption_mask(CAPTIONS)
    loss = contrastive_loss(images, texts, torch.tensor(2.0, dtype=torch.float64), same_caption=same)
    assert abs(loss.item() - naive_masked_loss(images, texts, 2.0, same.tolist())) < 1e-9
    # a mask with only the diagonal is the plain loss
    plain = contrastive_loss(
        images, texts, torch.tensor(2.0, dtype=torch.float64), same_caption=torch.eye(6) > 0
    )
    assert abs(plain.item() - naive_loss(images, texts, 2.0)) < 1e-9


def test_siglip_loss_counts_same_caption_pairs_as_matches():
    images, texts = random_embeds(6, 8, 10), random_embeds(6, 8, 11)
    same = caption_mask(CAPTIONS)
    scale, bias = torch.tensor(1.5, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    loss = siglip_loss(images, texts, scale, bias, same_caption=same)
    assert abs(loss.item() - naive_masked_siglip_loss(images, texts, 1.5, -2.0, same.tolist())) < 1e-9


def test_a_same_caption_mask_of_the_wrong_shape_is_refused():
    images = random_embeds(4, 8, 12)
    with pytest.raises(ValueError, match=r"same_caption must be \[batch, global batch\]"):
        contrastive_loss(images, images, torch.tensor(1.0), same_caption=torch.ones(4, 3, dtype=torch.bool))


def test_losses_are_chosen_by_name():
    assert get_loss("clip") is contrastive_loss and get_loss("siglip") is siglip_loss
    with pytest.raises(ValueError, match="unknown loss 'sigmoid'"):
        get_loss("sigmoid")


WORLD, LOCAL_BATCH, DIM_IN, DIM_OUT = 2, 3, 5, 4


def tower_inputs():
    generator = torch.Generator().manual_seed(7)
    image_inputs = torch.randn(WORLD * LOCAL_BATCH, DIM_IN, generator=generator, dtype=torch.float64)
    text_inputs = torch.randn(WORLD * LOCAL_BATCH, DIM_IN, generator=generator, dtype=torch.float64)
    weights = [torch.randn(DIM_IN, DIM_OUT, generator=generator, dtype=torch.float64) for _ in range(2)]
    return image_inputs, text_inputs, weights


def loss_and_grads(image_inputs, text_inputs, weights, loss_name="clip", same_caption=None):
    """Loss of two linear 'towers' and the gradients of their weights, the logit scale and bias."""
    image_weight, text_weight = (w.clone().requires_grad_(True) for w in weights)
    logit_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    image_embeds = F.normalize(image_inputs @ image_weight, dim=-1)
    text_embeds = F.normalize(text_inputs @ text_weight, dim=-1)
    loss = get_loss(loss_name)(image_embeds, text_embeds, logit_scale, logit_bias, same_caption=same_caption)
    loss.backward()
    bias_grad = logit_bias.grad if logit_bias.grad is not None else torch.zeros_like(logit_bias)
    return loss.detach(), [image_weight.grad, text_weight.grad, logit_scale.grad, bias_grad]


LOSS_NAMES = ("clip", "siglip")
GLOBAL_CAPTIONS = torch.tensor(CAPTIONS)  # WORLD * LOCAL_BATCH rows; duplicates across the ranks


def token_rows(captions, rank):
    """Token ids of `captions`, padded to a length that differs between the ranks (as a collator's do)."""
    length = 4 + rank
    ids = torch.zeros(len(captions), length, dtype=torch.long)
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions.tolist()):
        tokens = [101, 7 + caption, 102][: 2 + (caption > 0)]  # captions of 2 or 3 tokens
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
    return ids, mask


def distributed_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    image_inputs, text_inputs, weights = tower_inputs()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    same_caption = same_caption_mask(*token_rows(GLOBAL_CAPTIONS[rows], rank))  # [local, global]
    queue.put(("mask", rank, same_caption.numpy()))
    for loss_name, dedupe in [(name, dedupe) for name in LOSS_NAMES for dedupe in (False, True)]:
        mask = same_caption if dedupe else None
        loss, grads = loss_and_grads(image_inputs[rows], text_inputs[rows], weights, loss_name, mask)
        # What DDP does: average the loss and each gradient over ranks.
        for tensor in [loss, *grads]:
            dist.all_reduce(tensor)
            tensor /= WORLD
        # As numpy arrays, which pickle by value: a tensor would travel as a shared-memory file
        # handle that the parent cannot open once this process has exited.
        queue.put(((loss_name, dedupe), loss.numpy(), [grad.numpy() for grad in grads]))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_rank_losses_gradients_and_caption_masks_equal_single_process():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=distributed_worker, args=(r, port, queue)) for r in range(WORLD)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in range(WORLD * (1 + 2 * len(LOSS_NAMES)))]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    masks = {rank: mask for name, rank, mask in results if name == "mask"}
    full_mask = caption_mask(CAPTIONS)
    for rank, mask in masks.items():  # duplicates found across ranks, whatever each rank's padding
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert torch.equal(torch.from_numpy(mask), full_mask[rows])
    for (loss_name, dedupe), loss, grads in (result for result in results if result[0] != "mask"):
        expected_loss, expected_grads = loss_and_grads(
            *tower_inputs(), loss_name, full_mask if dedupe else None
        )
        torch.testing.assert_close(torch.from_numpy(loss), expected_loss, atol=1e-10, rtol=1e-10)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-10, rtol=1e-10)
