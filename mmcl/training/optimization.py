"""The optimizer and the learning-rate schedule of a run (transformers' schedules)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (`train.optim`: foreach or fused; an unresolved `auto` is foreach); biases, norms and logit_scale (every parameter of
    dim < 2) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=cfg.optim == "adamw_torch_fused" or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    if cfg.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
