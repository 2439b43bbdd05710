"""Contrastive losses. `build_loss(cfg)` gives the one `loss.name` selects. Every loss is called
with the model's `DualEncoderOutput` (unit-norm embeddings, logit_scale, logit_bias) and optional
pair ids (`image_ids`, `text_ids`: twins are never negatives)."""

from __future__ import annotations

from torch import nn

from ..config import LossConfig
from .clip import ClipLoss
from .siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "build_loss", "init_logit_bias"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss `cfg.name` names."""
    match cfg.name:
        case "clip":
            return ClipLoss()
        case "siglip":
            return SigLipLoss()
    raise AssertionError(f"unhandled loss {cfg.name!r}")  # the config's Literal type admits no other


def init_logit_bias(cfg: LossConfig) -> float | None:
    """Where the model's learned logit bias starts, for a loss that uses one (else None: no bias)."""
    return cfg.init_logit_bias if cfg.name == "siglip" else None
