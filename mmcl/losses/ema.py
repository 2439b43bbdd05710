"""Frozen copies of (part of) the model for the EMA terms (the momentum queue's copy, BYOL's target),
sharded as the model is.

Without sharding a copy is a deep copy. FSDP2 refuses deep copies, and a full copy per process
would undo the sharding anyway: there the copy is the `blueprint` (an unsharded copy of the model
taken before Accelerate prepared it), each sub-module the model shards is sharded the same way on the
same device mesh, and the copy's shards take the model's current values. An EMA step is then a local `lerp_` between shards of the same placement.
"""

from __future__ import annotations

import copy
import torch
from torch import nn


def frozen_copy(online: nn.Module, blueprint: nn.Module | None) -> nn.Module:
    """A copy of `online` without gradients, in eval mode; `blueprint`: the same part of the model
    before it was sharded (needed, and consumed, only under FSDP2)."""
    sharded = [p for p in online.parameters() if type(p).__name__ == "DTensor"]
    if not sharded:
        return copy.deepcopy(online).requires_grad_(False).eval()
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if blueprint is None:
        raise ValueError("a sharded model's EMA copy needs its blueprint (an unsharded copy taken before prepare)")
    replica, mesh = blueprint, sharded[0].device_mesh  # on the host: fully_shard moves each shard to the device
    parts = dict(replica.named_modules())
    groups = [name for name, sub in online.named_modules() if isinstance(sub, FSDPModule) and name]
    for name in sorted(groups, key=lambda n: -n.count(".")):  # innermost first, as the model was sharded
        fully_shard(parts[name], mesh=mesh)
    fully_shard(replica, mesh=mesh)  # the rest (embeddings, heads) as one more group
    theirs = dict(online.named_parameters())
    with torch.no_grad():
        for name, mine in replica.named_parameters():
            mine.copy_(theirs[name].detach())
        for name, buffer in online.named_buffers():
            replica.get_buffer(name).copy_(buffer)
    return replica.requires_grad_(False).eval()


@torch.no_grad()
def ema_(replica: nn.Module, online: nn.Module, weight: float) -> None:
    """replica <- replica + weight (online - replica), parameter by parameter (by name), shard by
    shard when sharded."""
    reshard(online, replica)
    theirs = dict(online.named_parameters())
    for name, mine in replica.named_parameters():
        mine.lerp_(theirs[name].detach().to(mine.dtype), weight)


def reshard(*modules: nn.Module) -> None:
    """Put every FSDP2 group in `modules` back in its sharded form (a no-op for one that is, and
    without FSDP2): a root keeps its gathered tensors after a forward, and an EMA pairs shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()
