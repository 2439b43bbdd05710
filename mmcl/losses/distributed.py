"""Cross-process helpers for contrastive losses: every rank's rows, with or without gradient."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, (world * B, D), keeping the autograd graph; and this rank's index.

    `torch.distributed.nn.functional.all_gather` sums the incoming gradients over ranks in its
    backward. Together with DDP's gradient *averaging* this gives exactly the gradient of the
    global-batch loss: see `ClipLoss`. (`accelerator.gather` carries no gradient.)
    """
    if not is_distributed():
        return features, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0), dist.get_rank()


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order, (world * B, ...), without gradient (ids, queued features)."""
    if not is_distributed():
        return ids
    ids = ids.contiguous()
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids)
    return torch.cat(out)


def all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """`tensor` summed (or reduced by `op`) over all processes, in place, without gradient."""
    if is_distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor
