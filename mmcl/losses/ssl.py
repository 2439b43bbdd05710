"""SLIP's image–image term: SimCLR's NT-Xent loss on two augmented views of each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_ids, gather_with_grad


class NTXentLoss(nn.Module):
    """NT-Xent (Chen et al. 2020, SimCLR; used by Mu et al. 2022, SLIP) over the global batch.

    Inputs: `views` (2B, D), unit norm, rows 2i and 2i+1 the two views of image i; optional
    `image_ids` (B,). Each view's positive is its partner; its negatives are every other view of
    the global batch, except views of the same image bytes (twins). Logits are cosine / temperature.
    Like `ClipLoss`, each rank scores its own views against the gathered views (with gradient), so
    N processes with batch b take the step of one process with batch N*b.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, views: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        views = views.float()
        all_views, rank = gather_with_grad(views)
        logits = views @ all_views.T / self.temperature  # (2B, world * 2B)
        rows = torch.arange(len(views), device=views.device)
        own = rows + rank * len(views)
        partner = (rows ^ 1) + rank * len(views)
        excluded = torch.zeros_like(logits, dtype=torch.bool)
        if image_ids is not None:
            ids = image_ids.repeat_interleave(2)
            excluded = ids[:, None] == gather_ids(ids)[None, :]
            excluded[rows, partner] = False
        excluded[rows, own] = True
        return F.cross_entropy(logits.masked_fill(excluded, float("-inf")), partner)


class ImageSSL(nn.Module):
    """`weight` x NT-Xent on the model output's `view_embeds` (the model's image–image head)."""

    def __init__(self, weight: float, temperature: float = 0.1) -> None:
        super().__init__()
        self.weight, self.loss = weight, NTXentLoss(temperature)

    def forward(self, view_embeds: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * self.loss(view_embeds, image_ids)
