"""SigLIP's pairwise sigmoid loss over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..towers.model import DualEncoderOutput
from .distributed import gather_ids, gather_with_grad
from .negatives import Negatives, duplicate_mask


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): every (image, text) pair of the global batch is a binary
    problem, positive for the matching pair and negative for all others, on the logit
    `exp(logit_scale) * cos(image, text) + logit_bias`:

        loss = -sum_{i, j} log sigmoid(z_ij * logit_ij) / B_local,   z_ij = +1 if j is i's text else -1

    With several processes each rank gathers every rank's text embeddings *with gradient* and
    scores its own images against them: its logits are (B_local, B_global), so every pair of the
    global batch is scored exactly once, and memory is O(B_local x B_global). The mean over ranks
    of the per-rank losses equals one process's loss on the global batch; with DDP's gradient
    averaging, N processes with batch b take the step of one process with batch N*b.

    Twins (the same image bytes, or the identical caption, as pair i; see `ClipLoss`) are left out
    of pair i's sum: they are neither positives nor negatives.

    Inputs: the model's output `out` with unit-norm image_embeds and text_embeds (B, D), the scalar
    logit_scale and logit_bias (the model must have a bias: `loss.name: siglip` gives it one);
    optional image_ids / text_ids (B,) int64; optional `negatives` (a queue, hard-negative captions):
    every extra (image, text) pairing they add is one more negative term, twins left out.
    Returns this rank's scalar loss.

    Reference: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (init logit_scale
    ln 10, logit_bias -10).
    """

    def forward(self, out: DualEncoderOutput, image_ids: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, negatives: Negatives | None = None) -> torch.Tensor:
        if out.logit_bias is None:
            raise ValueError("SigLipLoss needs a model with a logit bias (build it with init_logit_bias)")
        images, texts = out.image_embeds.float(), out.text_embeds.float()  # float32 under autocast too
        all_texts, rank = gather_with_grad(texts)
        scale, bias = out.logit_scale.float().exp(), out.logit_bias.float()
        logits = scale * images @ all_texts.T + bias  # (B, world * B)
        batch = images.shape[0]
        targets = torch.arange(batch, device=images.device) + rank * batch
        signs = -torch.ones_like(logits)
        signs[torch.arange(batch, device=images.device), targets] = 1.0
        pair_losses = -F.logsigmoid(signs * logits)  # (B, world * B)
        if image_ids is not None and text_ids is not None:
            all_image_ids = gather_ids(image_ids)
            twins = duplicate_mask(image_ids, text_ids, all_image_ids, gather_ids(text_ids), targets)
            pair_losses = pair_losses.masked_fill(twins, 0.0)
        total = pair_losses.sum()
        if negatives is not None:
            total = total + _negative_terms(scale, bias, *negatives.image_side(images, image_ids, text_ids))
            total = total + _negative_terms(scale, bias, *negatives.text_side(texts, image_ids, text_ids))
        return total / batch


def _negative_terms(scale: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None,
                    twins: torch.Tensor | None) -> torch.Tensor | float:
    """The summed loss of extra pairings, all negatives (twins left out)."""
    if extra is None:
        return 0.0
    losses = -F.logsigmoid(-(scale * extra.float() + bias))
    return losses.masked_fill(twins, 0.0).sum() if twins is not None else losses.sum()
