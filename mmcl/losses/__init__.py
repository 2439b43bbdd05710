"""Contrastive losses. `build_loss(cfg)` gives the one `loss.name` selects; each loss takes the
model's `DualEncoderOutput` fields (unit-norm embeddings, logit_scale) and optional pair ids."""

from __future__ import annotations

from torch import nn

from ..config import LossConfig
from .clip import ClipLoss

__all__ = ["ClipLoss", "build_loss"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss `cfg.name` names."""
    match cfg.name:
        case "clip":
            return ClipLoss()
    raise AssertionError(f"unhandled loss {cfg.name!r}")  # the config's Literal type admits no other
