"""GradCache (Gao et al. 2021): the loss of a batch larger than memory, one chunk's activations at a time.

`cached_step` embeds the batch in chunks without a graph, computes the loss and its gradient with
respect to the embeddings, then re-runs each chunk with a graph and back-propagates that gradient
through it. The step is the full-batch step: each chunk's random state (dropout) is replayed, so the
re-run equals the first pass. Memory: one chunk's activations plus the (B, global B) logits.

Where the backward happens: `cached_step` calls `accelerator.backward` itself for every chunk but
the last (inside `no_sync`, so DDP reduces gradients once); the last chunk's graph is returned in
the loss, and the loop's own `accelerator.backward` runs it (and syncs, or not inside an
accumulation) as for any other objective.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from ..towers.model import DualEncoderOutput

Terms = dict[str, torch.Tensor]
LossOf = Callable[[DualEncoderOutput], tuple[torch.Tensor, Terms]]  # embeddings -> (loss, its named terms)
VIEWS = "view_pixel_values"  # SLIP: two views per image, rows 2i and 2i + 1


class RngState:
    """The CPU and accelerator random state at one moment, to replay dropout exactly."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.module = torch.get_device_module(device) if device.type not in ("cpu", "meta") else None
        self.device = self.module.get_rng_state() if self.module is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.module is not None:
            self.module.set_rng_state(self.device)


def split_rows(batch: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """The batch in `chunks` row slices. Images and texts are cut separately (a row's hard-negative
    captions make the text side longer); an image's two SLIP views stay in its chunk."""
    images = torch.tensor_split(batch["pixel_values"], chunks)
    parts = {k: torch.tensor_split(v, chunks) for k, v in batch.items() if k != VIEWS}
    if VIEWS in batch:
        parts[VIEWS] = batch[VIEWS].split([2 * len(chunk) for chunk in images])
    return [{k: v[i] for k, v in parts.items()} for i in range(chunks)]


def _dot(embeds: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | float:
    """A scalar whose gradient with respect to `embeds` is `grad`."""
    return 0.0 if embeds is None or grad is None else (embeds * grad.to(embeds.dtype)).sum()


def _cat(outs: list[DualEncoderOutput], field: str) -> torch.Tensor | None:
    parts = [getattr(o, field) for o in outs]
    return None if parts[0] is None else torch.cat(parts).detach().requires_grad_()


def cached_step(model: nn.Module, chunks: list[dict[str, torch.Tensor]], loss_of: LossOf, accelerator: Any,
                loss_params: Callable[[], list[nn.Parameter]] | None = None
                ) -> tuple[torch.Tensor, Terms, DualEncoderOutput]:
    """(the loss of the whole batch, ready for the loop's `accelerator.backward`; its terms, detached;
    the batch's embeddings, detached). `loss_params`: the parameters `loss_of` itself runs on the
    embeddings (BYOL's predictor, SwAV's prototypes); their gradient joins the last chunk's. A callable,
    read after the forwards: under FSDP2 the tensors a module holds change between its sharded and
    its gathered form, and the gradient must reach the gathered ones its forward used. See the
    module docstring."""
    if callable(getattr(model, "unshard", None)):  # FSDP2 resharded after the no-grad forwards: gather the
        model.unshard()                             # parameters the loss itself runs (its backward reshards)
    own = [p for p in (loss_params or list)() if p.requires_grad]
    device = chunks[0]["pixel_values"].device
    # Step (1): embed every chunk without a graph, keeping the random state each started from
    states, first = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            first.append(model(**chunk))
    # Step (2): the loss on all embeddings, and its gradient with respect to them (and the temperature, bias)
    embeds = {name: _cat(first, name) for name in ("image_embeds", "text_embeds", "view_embeds")}
    scale, bias = first[-1].logit_scale, first[-1].logit_bias
    scalars = [p for p in (scale, bias) if p is not None and p.requires_grad]
    loss, terms = loss_of(DualEncoderOutput(embeds["image_embeds"], embeds["text_embeds"], scale, bias,
                                            embeds["view_embeds"]))
    leaves = [e for e in embeds.values() if e is not None]
    grads = torch.autograd.grad(loss, leaves + scalars + own, allow_unused=True)
    by_name = dict(zip([n for n, e in embeds.items() if e is not None], grads))
    sizes = {name: [len(getattr(o, name)) for o in first] for name in by_name}
    split = {name: (g.split(sizes[name]) if g is not None else [None] * len(chunks)) for name, g in by_name.items()}
    # Step (3): re-run each chunk with its graph and the same random draws; back-propagate the cached
    # gradient through it (every chunk but the last here, without DDP's gradient sync)
    after = RngState(device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        states[i].restore()
        with nullcontext() if last else accelerator.no_sync(model):
            rerun = model(**chunk)
            surrogate = sum(_dot(getattr(rerun, name), split[name][i]) for name in split)
            if not last:
                accelerator.backward(surrogate)
    after.restore()
    rerun_scalars = [p for p in (rerun.logit_scale, rerun.logit_bias) if p is not None and p.requires_grad]
    rerun_own = [p for p in (loss_params or list)() if p.requires_grad]
    for param, grad in zip(rerun_scalars + rerun_own, grads[len(leaves):]):
        if grad is not None:
            surrogate = surrogate + (param * grad).sum()  # keep the loss 0-d
    detached = DualEncoderOutput(*(e.detach() if e is not None else None for e in
                                   (embeds["image_embeds"], embeds["text_embeds"])), scale, bias)
    return loss.detach() + surrogate - surrogate.detach(), {k: v.detach() for k, v in terms.items()}, detached
