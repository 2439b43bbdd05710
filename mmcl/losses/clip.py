"""Symmetric InfoNCE with negatives shared across all processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..towers.model import DualEncoderOutput
from .distributed import gather_ids, gather_with_grad, is_distributed
from .negatives import Negatives, duplicate_mask
from .symmetric import symmetric_infonce


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropy over
    cosine similarities scaled by exp(logit_scale).

    With several processes, each rank gathers every rank's embeddings *with gradient* and
    computes only its own rows against the global batch ("local loss", as open_clip):
    logits_per_image is (B_local, B_global) and the targets are offset by rank * B_local.
    Each rank's loss is the mean over its own rows, so the mean over ranks equals the loss of one
    process on the whole global batch. Gradients: the all_gather backward sums each rank's
    contributions to every rank's embeddings, and DDP averages the per-rank gradients, so N
    processes with batch b take the same step as 1 process with batch N*b
    (tests/test_distributed.py checks this to 1e-5).

    Duplicates: when `image_ids` / `text_ids` are given (one id per example: same image -> same
    id, identical caption -> same id), a pair whose image or caption also appears elsewhere in the
    global batch is not pushed away from its twin: those logits are masked out of the softmax.

    Inputs: the model's output `out`: image_embeds (B, D), text_embeds (B, D), both unit norm, row i
    of each a pair; logit_scale, a one-element tensor (the log of the inverse temperature); optional
    image_ids and text_ids, (B,) int64.
    Returns the scalar loss of this rank.

    References: Radford et al. 2021 (CLIP); open_clip's ClipLoss (local_loss, gather_with_grad).
    """

    def forward(self, out: DualEncoderOutput, image_ids: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, negatives: Negatives | None = None) -> torch.Tensor:
        # The softmax runs in float32 even under bf16 autocast.
        image_embeds, text_embeds = out.image_embeds.float(), out.text_embeds.float()
        scale = out.logit_scale.float().exp()
        batch = image_embeds.shape[0]
        rank = torch.distributed.get_rank() if is_distributed() else 0
        targets = torch.arange(batch, device=image_embeds.device) + rank * batch
        mask = None
        if image_ids is not None and text_ids is not None:
            mask = duplicate_mask(image_ids, text_ids, gather_ids(image_ids), gather_ids(text_ids), targets)
            mask = mask if mask.any() else None
        if not is_distributed() and mask is None and negatives is None:
            return symmetric_infonce(image_embeds, text_embeds, scale)  # one matrix, same value and gradients
        all_images, _ = gather_with_grad(image_embeds)
        all_texts, _ = gather_with_grad(text_embeds)
        logits_per_image = scale * image_embeds @ all_texts.T  # (B, world * B)
        logits_per_text = scale * text_embeds @ all_images.T  # (B, world * B)
        if mask is not None:
            logits_per_image = logits_per_image.masked_fill(mask, float("-inf"))
            logits_per_text = logits_per_text.masked_fill(mask, float("-inf"))
        if negatives is not None:
            logits_per_image = _extend(logits_per_image, scale, *negatives.image_side(image_embeds, image_ids, text_ids))
            logits_per_text = _extend(logits_per_text, scale, *negatives.text_side(text_embeds, image_ids, text_ids))
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def _extend(logits: torch.Tensor, scale: torch.Tensor, extra: torch.Tensor | None,
            twins: torch.Tensor | None) -> torch.Tensor:
    """The batch logits with extra candidate columns appended (twins at -inf)."""
    if extra is None:
        return logits
    extra = scale * extra.float()
    if twins is not None:
        extra = extra.masked_fill(twins, float("-inf"))
    return torch.cat([logits, extra], dim=1)
