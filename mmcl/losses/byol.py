"""BYOL's image–image term (Grill et al. 2020): no negatives; an online network regresses a slowly
moving target network's projection of the other view of the same image.

Online: the vision tower and the image–image head (the projector, shared with SLIP's term) in the
model's forward, then the model's predictor MLP, which this module runs on the *whole gathered
batch*: its batch norm is what keeps the term from collapsing (a predictor without one collapsed
on the toy set), and statistics over one chunk or one process would make GradCache and N processes
differ from the full-batch step. Target: an EMA copy of the vision tower and
the head (sharded as the model is, `mmcl.losses.ema`), run without a graph. The EMA rate follows
BYOL's schedule, tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2 over the run's K optimizer steps,
and moves once per optimizer step (the first micro-batch of each). The
copy and its step count are this module's parameters and buffers: checkpoints keep them.

Against SLIP's NT-Xent: BYOL needs no negatives, so it does not weaken at a small batch or when the
batch holds near-duplicates (many emoji differ only in skin tone), at the price of a second copy of
the vision tower and one more vision forward per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..towers.lora import is_adapter_weight, merged_weights
from ..towers.model import pool
from .ema import frozen_copy, reshard
from .distributed import gather_with_grad


def byol_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric normalised regression: rows 2i and 2i + 1 are image i's two views; each view's
    prediction (unit norm) regresses the other view's target projection (unit norm, no gradient):
    mean over views of ||p - z'||^2 = 2 - 2 cos(p, z')."""
    partner = torch.arange(len(predictions), device=predictions.device) ^ 1
    return (2.0 - 2.0 * (predictions.float() * targets.float().detach()[partner]).sum(dim=-1)).mean()


class BYOL(nn.Module):
    """`weight` x `byol_loss` against the EMA target's projections. Call `before_step(model)` at the start
    of every micro-batch and `targets(views)` for the batch's views; then the module on the model and
    the views' online embeddings (the model's `view_embeds`, its own rows of the global batch)."""

    def __init__(self, weight: float, momentum: float, model: nn.Module, max_steps: int,
                 accumulation_steps: int = 1, blueprint: nn.Module | None = None) -> None:
        super().__init__()
        self.weight, self.base_momentum = weight, momentum
        self.max_steps, self.accumulation_steps = max(1, max_steps), accumulation_steps
        self.target = TargetNetwork(extract_model_from_parallel(model), blueprint)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def momentum(self, step: int) -> float:
        """tau at optimizer step `step`: tau_0 at the start, 1 at the end of the run."""
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * min(step, self.max_steps) / self.max_steps)
                                                   + 1.0) / 2.0

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        """target <- tau target + (1 - tau) online, on the first micro-batch of each optimizer step."""
        calls = int(self.calls)
        if calls % self.accumulation_steps == 0:
            self.target.follow(extract_model_from_parallel(model), self.momentum(calls // self.accumulation_steps))
        self.calls += 1

    @torch.no_grad()
    def targets(self, views: torch.Tensor) -> torch.Tensor:
        """The target's unit-norm projections of the views, (2B, D)."""
        self.target.eval()
        return self.target(views)

    def forward(self, model: nn.Module, view_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The term on this process's views. The predictor runs on every process's views at once
        (gathered with gradient, as `ClipLoss` gathers), and each process scores its own rows."""
        every, rank = gather_with_grad(view_embeds)
        predictor = extract_model_from_parallel(model).training_head("predictor")
        weight = predictor[0].weight  # its dtype: FSDP2 with bf16 gathers the predictor in bf16
        predictions = F.normalize(predictor(every.to(weight.dtype)).float(), dim=-1)
        mine = predictions[rank * len(view_embeds):(rank + 1) * len(view_embeds)]
        return self.weight * byol_loss(mine, targets)

    @staticmethod
    def parameters_of(model: nn.Module) -> list[nn.Parameter]:
        """The parameters the term runs itself (the predictor's), for GradCache."""
        return list(extract_model_from_parallel(model).training_head("predictor").parameters())


class TargetNetwork(nn.Module):
    """BYOL's target: frozen copies of the model's vision tower and image–image head (same names, so
    the EMA pairs them by name), giving unit-norm projections of views.

    The EMA runs on the online model's *effective* weights: with LoRA adapters on the vision tower,
    each adapted layer's weight merged with its update (`merged_weights`), averaged into the target's
    base weight, while the target's own adapters stay zero. Averaging the two adapter factors apart
    would average neither the update nor the layer. Float buffers (batch-norm statistics) are
    averaged as the weights are."""

    def __init__(self, model: nn.Module, blueprint: nn.Module | None = None) -> None:
        super().__init__()
        self.vision_model = frozen_copy(model.vision_model, blueprint and blueprint.vision_model)
        self.image_ssl_head = frozen_copy(model.image_ssl_head, blueprint and blueprint.image_ssl_head)
        self.pooling = model.config.vision_pooling
        self.requires_grad_(False).eval()
        for name, param in self.named_parameters():
            if is_adapter_weight(name):
                param.data.zero_()  # no update of its own: the base weight holds the merged one
        self.follow(model, 0.0)

    @torch.no_grad()
    def follow(self, model: nn.Module, tau: float) -> None:
        """Every float weight and buffer <- tau itself + (1 - tau) the online model's effective one."""
        reshard(model, self)
        online = effective_weights(model)
        for name, mine in self.state_dict(keep_vars=True).items():
            if is_adapter_weight(name):
                continue
            theirs = online[name.replace(".base_layer.", ".")].detach().to(mine.device)
            if mine.is_floating_point():
                mine.data.lerp_(theirs.to(mine.dtype), 1.0 - tau)
            else:
                mine.data.copy_(theirs)  # counters (batch norm's num_batches_tracked)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        pooled = pool(self.vision_model(pixel_values=views), None, self.pooling)
        return F.normalize(self.image_ssl_head(pooled), dim=-1)


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The online vision tower's and head's weights and buffers as a plain model would hold them."""
    tower = merged_weights(model.vision_model)
    tower = tower if tower is not None else model.vision_model.state_dict()
    head = model.image_ssl_head.state_dict()
    return {**{f"vision_model.{k}": v for k, v in tower.items()}, **{f"image_ssl_head.{k}": v for k, v in head.items()}}
