"""The training-only heads a loss adds to the dual encoder (never exported): SLIP's / BYOL's / SwAV's
image–image head, BYOL's predictor and SwAV's prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# each head's attribute on the DualEncoder and the DualEncoderConfig field that adds it
TRAINING_HEADS = {"image_ssl_head": "image_ssl_dim", "predictor": "predictor_hidden", "prototypes": "swav_prototypes"}


def ssl_head(width: int, dim: int) -> nn.Module:
    """SLIP's image–image projection: an MLP on the vision tower's pooled features (used only in
    training; exports leave it out)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, dim))


def predictor_head(dim: int, hidden: int) -> nn.Module:
    """BYOL's predictor: an MLP from the image–image head's unit-norm output back to its width (training
    only). Its batch norm is what keeps BYOL from collapsing here (a GELU MLP collapsed in 30 steps), so
    the objective runs it on the whole gathered batch (`mmcl.losses.byol`), never per chunk or per process."""
    # no bias before the batch norm: it would cancel it, and Adam would turn its zero gradient's rounding
    # noise into full-size steps (2 processes and 1 then differ by ~1e-4 in it)
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))


def prototype_layers(count: int, embed_dim: int, ssl_dim: int | None) -> nn.ModuleDict:
    """SwAV's prototypes (training only): `count` unit vectors in the joint embedding space ("pairs")
    and, with an image–image head, in its output space ("views"), as bias-free linear layers."""
    layers = {"pairs": nn.Linear(embed_dim, count, bias=False)}
    if ssl_dim is not None:
        layers["views"] = nn.Linear(ssl_dim, count, bias=False)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(F.normalize(layer.weight, dim=-1))
    return nn.ModuleDict(layers)
