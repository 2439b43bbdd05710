"""The one thing the training loop calls: `objective(model, batch)` -> this rank's loss for one
micro-batch, ready for `accelerator.backward`.

The objective runs the *prepared* model itself, because some losses need more than one forward:
GradCache embeds the batch in chunks and re-runs them, a queue runs its momentum copy, SLIP runs
extra image views. The loop stays the same for all of them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..towers.model import DualEncoderOutput
from .negatives import Negatives
from .queue import FeatureQueue
from .ssl import ImageSSL

ID_KEYS = ("image_ids", "text_ids")


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
    """The batch in `chunks` row slices; images and texts are cut separately (a row's hard-negative
    captions make the text side longer)."""
    parts = {k: torch.tensor_split(v, chunks) for k, v in batch.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(chunks)]


def _dot(embeds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to `embeds` is `grad`."""
    return (embeds * grad.to(embeds.dtype)).sum()


class Objective(nn.Module):
    """A pair loss (`ClipLoss` / `SigLipLoss`) plus what feeds it more candidates or more signal.

    cache_chunk > 0: GradCache (Gao et al. 2021). Embed the batch `cache_chunk` rows at a time
    without a graph, compute the loss and its gradient with respect to the embeddings (and the
    temperature and bias), then re-run each chunk with a graph and back-propagate the cached
    gradient through it. Each chunk's random state (dropout) is replayed, so the re-run equals the
    first pass and the step equals the full-batch step with the same dropout draws. Under DDP every
    re-run but the last is inside `no_sync`; the last one is returned for the loop's
    `accelerator.backward`, which syncs (or not, inside an accumulation) as usual. Memory: one
    chunk's activations plus the (B, global B) logits.

    image_ssl: SLIP's term on the two augmented views in the batch's `view_pixel_values`, which the
    model's image–image head embeds in the same forward.

    Hard negatives: when the batch's texts are longer than its images, the extra rows are each
    image's `k` hard-negative captions (the collator puts them after the B captions).
    """

    def __init__(self, loss: nn.Module, accelerator: Any = None, cache_chunk: int = 0,
                 queue: FeatureQueue | None = None, image_ssl: ImageSSL | None = None) -> None:
        super().__init__()
        self.loss, self.accelerator, self.cache_chunk = loss, accelerator, cache_chunk
        self.queue, self.image_ssl = queue, image_ssl

    def has_state(self) -> bool:
        """Whether a checkpoint must keep this objective (a queue, a momentum copy)."""
        return self.queue is not None

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        ids = {k: batch.pop(k) for k in ID_KEYS if k in batch}
        row_ids = batch.pop("negative_text_ids", None)
        views = batch.pop("view_pixel_values", None)
        if self.queue is not None:
            self.queue.before_step(model)
        if self.cache_chunk:
            chunks = split_rows(batch, math.ceil(len(batch["pixel_values"]) / self.cache_chunk))
            loss, out = self.cached(model, chunks, ids, row_ids)
        else:
            chunks = [batch]
            out = model(**batch, **({} if views is None else {"view_pixel_values": views}))
            loss = self.pair_loss(out, ids, row_ids)
        if self.queue is not None:
            self.enqueue(out, chunks, ids)
        if self.image_ssl is not None:
            loss = loss + self.image_ssl(out.view_embeds, ids.get("image_ids"))
        return loss

    def pair_loss(self, out: DualEncoderOutput, ids: dict[str, torch.Tensor],
                  row_ids: torch.Tensor | None) -> torch.Tensor:
        out, negatives = self.candidates(out, row_ids)
        return self.loss(out, **ids, negatives=negatives)

    def candidates(self, out: DualEncoderOutput, row_ids: torch.Tensor | None) -> tuple[DualEncoderOutput, Negatives | None]:
        """The batch's own pairs, and the extra candidates: hard-negative captions, the queue."""
        negatives = self.queue.negatives() if self.queue is not None else None
        batch = out.image_embeds.shape[0]
        if out.text_embeds.shape[0] > batch:
            texts = out.text_embeds
            negatives = negatives or Negatives()
            negatives.row_texts = texts[batch:].view(batch, -1, texts.shape[-1])
            negatives.row_text_ids = row_ids
            out = DualEncoderOutput(out.image_embeds, texts[:batch], out.logit_scale, out.logit_bias)
        return out, negatives

    def enqueue(self, out: DualEncoderOutput, chunks: list[dict[str, torch.Tensor]],
                ids: dict[str, torch.Tensor]) -> None:
        batch = out.image_embeds.shape[0]
        inputs = chunks
        if self.queue.momentum_model is not None and len(chunks[0]["input_ids"]) != len(chunks[0]["pixel_values"]):
            whole = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}  # drop the hard negatives
            inputs = split_rows({k: v if k == "pixel_values" else v[:batch] for k, v in whole.items()}, len(chunks))
        images, texts = self.queue.keys(out, inputs)
        self.queue.push(images, texts[:batch], ids.get("image_ids"), ids.get("text_ids"))

    def cached(self, model: nn.Module, chunks: list[dict[str, torch.Tensor]], ids: dict[str, torch.Tensor],
               row_ids: torch.Tensor | None) -> tuple[torch.Tensor, DualEncoderOutput]:
        """GradCache: the loss of the whole batch, and its output; see the class docstring."""
        device = chunks[0]["pixel_values"].device
        states, first = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RngState(device))
                first.append(model(**chunk))
        images = torch.cat([o.image_embeds for o in first]).detach().requires_grad_()
        texts = torch.cat([o.text_embeds for o in first]).detach().requires_grad_()
        scalars = [p for p in (first[-1].logit_scale, first[-1].logit_bias) if p is not None and p.requires_grad]
        out = DualEncoderOutput(images, texts, first[-1].logit_scale, first[-1].logit_bias)
        loss = self.pair_loss(out, ids, row_ids)
        grads = torch.autograd.grad(loss, [images, texts, *scalars], allow_unused=True)
        image_grads = grads[0].split([len(o.image_embeds) for o in first])
        text_grads = grads[1].split([len(o.text_embeds) for o in first])
        after = RngState(device)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            states[i].restore()
            with nullcontext() if last else self.accelerator.no_sync(model):
                rerun = model(**chunk)
                surrogate = _dot(rerun.image_embeds, image_grads[i]) + _dot(rerun.text_embeds, text_grads[i])
                if not last:
                    self.accelerator.backward(surrogate)
        after.restore()
        rerun_scalars = [p for p in (rerun.logit_scale, rerun.logit_bias) if p is not None and p.requires_grad]
        for param, grad in zip(rerun_scalars, grads[2:]):
            if grad is not None:
                surrogate = surrogate + (param * grad).sum()  # a (1,) parameter: keep the loss 0-d
        return loss.detach() + surrogate - surrogate.detach(), DualEncoderOutput(
            images.detach(), texts.detach(), out.logit_scale, out.logit_bias)

