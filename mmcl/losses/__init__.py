"""Contrastive losses, the third stage (`clip`, `siglip`, `symmetric`, `negatives`, `distributed`,
`queue`, `ssl`, `byol`, `cache` for GradCache, `objective` for what the loop calls).

`build_loss(cfg)` gives the pair loss `loss.name` selects; it is called with the model's
`DualEncoderOutput` (unit-norm embeddings, logit_scale, logit_bias), optional pair ids
(`image_ids`, `text_ids`: twins are never negatives) and optional extra `Negatives`.
`build_objective(cfg, model, accelerator)` wraps it with what the config adds (GradCache, a
queue, the image–image term) into the callable the training loop runs: `objective(model, batch)`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..config import LossConfig
from .byol import BYOL, byol_loss
from .clip import ClipLoss
from .negatives import Negatives
from .objective import Objective
from .queue import FeatureQueue
from .siglip import SigLipLoss
from .ssl import ImageSSL, NTXentLoss
from .swav import SwAV, sinkhorn

__all__ = ["BYOL", "byol_loss", "ClipLoss", "FeatureQueue", "ImageSSL", "NTXentLoss", "Negatives", "Objective", "SigLipLoss", "build_loss",
           "build_objective", "image_ssl_dim", "init_logit_bias", "predictor_hidden", "sinkhorn", "SwAV", "swav_prototypes"]


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


def image_ssl_dim(cfg: LossConfig) -> int | None:
    """The width of the model's image–image head, for a loss with SLIP's or BYOL's term (else None: no head)."""
    return cfg.image_ssl_dim if cfg.image_ssl_weight or cfg.byol_weight or cfg.swav_weight else None


def predictor_hidden(cfg: LossConfig) -> int | None:
    """The hidden width of BYOL's predictor, for a loss with BYOL's term (else None: no predictor)."""
    return cfg.byol_predictor_hidden if cfg.byol_weight else None


def swav_prototypes(cfg: LossConfig) -> int | None:
    """How many prototypes SwAV's term learns per space (else None: no prototypes)."""
    return cfg.swav_prototypes if cfg.swav_weight else None


def needs_copy(cfg: LossConfig) -> bool:
    """Whether the objective keeps an EMA copy of (part of) the model: a momentum queue, BYOL's target."""
    return bool(cfg.queue_size and cfg.momentum) or bool(cfg.byol_weight)


def build_objective(cfg: LossConfig, model: nn.Module, accelerator: Any, max_steps: int = 1,
                    blueprint: nn.Module | None = None) -> Objective:
    """The training objective for the prepared `model` (its queue and BYOL's target copy it; call after
    `accelerator.prepare`), on the accelerator's device; `max_steps`: the run's, for BYOL's EMA schedule."""
    from accelerate.utils import extract_model_from_parallel

    queue = None
    second = blueprint  # BYOL's target is sharded from its own blueprint when the queue's copy takes one
    if blueprint is not None and cfg.queue_size and cfg.momentum and cfg.byol_weight:
        second = copy.deepcopy(blueprint)
    if cfg.queue_size:
        queue = FeatureQueue(cfg.queue_size, extract_model_from_parallel(model).embed_dim, cfg.momentum, model,
                             accelerator.gradient_accumulation_steps, blueprint)
    ssl = ImageSSL(cfg.image_ssl_weight, cfg.image_ssl_temperature) if cfg.image_ssl_weight else None
    byol = BYOL(cfg.byol_weight, cfg.byol_momentum, model, max_steps, accelerator.gradient_accumulation_steps,
                second) if cfg.byol_weight else None
    swav = None
    if cfg.swav_weight:
        unwrapped = extract_model_from_parallel(model)
        dims = {"views": unwrapped.config.image_ssl_dim,  # a head loaded with init_from keeps its own width
                "images": unwrapped.embed_dim, "texts": unwrapped.embed_dim}
        swav = SwAV(cfg.swav_weight, cfg.swav_temperature, cfg.swav_epsilon, cfg.swav_iterations, cfg.swav_freeze_steps,
                    cfg.swav_queue_size, dims, accelerator.gradient_accumulation_steps)
    return Objective(build_loss(cfg), accelerator, cfg.cache_chunk, queue, ssl, byol, swav).to(accelerator.device)
