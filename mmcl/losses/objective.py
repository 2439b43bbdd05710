"""The one thing the training loop calls: `objective(model, batch)` -> (this rank's loss for one
micro-batch, ready for `accelerator.backward`; its named terms, detached, for the log).

The objective runs the *prepared* model itself, because some losses need more than one forward:
GradCache embeds the batch in chunks and re-runs them (`mmcl.losses.cache`), a queue runs its
momentum copy, SLIP runs extra image views. The loop stays the same for all of them.

Terms (as open_clip's `output_dict`): `loss_pair` (the image–text loss, with its hard negatives and
queue) and, with SLIP, `loss_image_ssl`, with BYOL, `loss_byol`, with SwAV, `loss_swav_views` and
`loss_swav_pairs` (each already weighted); the loss is
their sum. With image views (SLIP, BYOL, SwAV) a diagnostic joins them, not in the loss: `view_std`,
the per-dimension standard deviation of the unit-norm views over the global batch (0 when every view
maps to one point, the collapse BYOL and SwAV can fall into; about 1/sqrt(D) when spread over all D
dimensions). The loop logs
each as `train/<term>`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..towers.model import DualEncoderOutput
from .byol import BYOL
from .swav import SwAV
from .cache import VIEWS, Terms, cached_step, split_rows
from .distributed import gather_ids
from .negatives import Negatives
from .queue import FeatureQueue
from .ssl import ImageSSL

ID_KEYS = ("image_ids", "text_ids")


class Objective(nn.Module):
    """A pair loss (`ClipLoss` / `SigLipLoss`) plus what feeds it more candidates or more signal.

    cache_chunk > 0: GradCache, `cache_chunk` rows at a time (`mmcl.losses.cache.cached_step`,
    which says where its backward happens); SLIP's views travel through the cache with their images.

    image_ssl: SLIP's term on the two augmented views in the batch's `view_pixel_values`, which the
    model's image–image head embeds in the same forward.

    queue: a MoCo-style queue of earlier embeddings as extra negatives (`FeatureQueue`).

    Hard negatives: when the batch's texts are longer than its images, the extra rows are each
    image's `k` hard-negative captions (the collator puts them after the B captions).
    """

    def __init__(self, loss: nn.Module, accelerator: Any = None, cache_chunk: int = 0,
                 queue: FeatureQueue | None = None, image_ssl: ImageSSL | None = None,
                 byol: BYOL | None = None, swav: SwAV | None = None) -> None:
        super().__init__()
        self.loss, self.accelerator, self.cache_chunk = loss, accelerator, cache_chunk
        self.queue, self.image_ssl, self.byol, self.swav = queue, image_ssl, byol, swav

    def has_state(self) -> bool:
        """Whether a checkpoint must keep this objective (a queue, a momentum or BYOL target copy, SwAV's
        step count and queue)."""
        return self.queue is not None or self.byol is not None or self.swav is not None

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Terms]:
        ids = {k: batch.pop(k) for k in ID_KEYS if k in batch}
        row_ids = batch.pop("negative_text_ids", None)
        if self.queue is not None:
            self.queue.before_step(model)
        targets = None
        if self.byol is not None:  # the EMA target's projections of the whole batch's views, no graph
            self.byol.before_step(model)
            views = batch[VIEWS]
            targets = torch.cat([self.byol.targets(v) for v in views.split(2 * self.cache_chunk or len(views))])
        if self.swav is not None:
            self.swav.before_step(model)

        def loss_of(out: DualEncoderOutput) -> tuple[torch.Tensor, Terms]:
            return self.terms(out, ids, row_ids, model, targets)

        if self.cache_chunk:
            chunks = split_rows(batch, math.ceil(len(batch["pixel_values"]) / self.cache_chunk))
            def own() -> list[nn.Parameter]:  # read when used: FSDP2 swaps sharded and gathered tensors
                return [p for term in (self.byol, self.swav) if term is not None for p in term.parameters_of(model)]

            loss, terms, out = cached_step(model, chunks, loss_of, self.accelerator, own)
        else:
            chunks = [batch]
            out = model(**batch)
            loss, terms = loss_of(out)
            terms = {k: v.detach() for k, v in terms.items()}
        if self.queue is not None:
            self.enqueue(out, [{k: v for k, v in c.items() if k != VIEWS} for c in chunks], ids)
        return loss, terms

    def terms(self, out: DualEncoderOutput, ids: dict[str, torch.Tensor], row_ids: torch.Tensor | None,
              model: nn.Module | None = None, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Terms]:
        """(the loss, its named terms) on the batch's embeddings (`model`: whose predictor and
        prototypes BYOL's and SwAV's terms run; `targets`: BYOL's target projections of the views)."""
        pair_out, negatives = self.candidates(out, row_ids)
        terms = {"loss_pair": self.loss(pair_out, **ids, negatives=negatives)}
        if self.image_ssl is not None:
            terms["loss_image_ssl"] = self.image_ssl(out.view_embeds, ids.get("image_ids"))
        if self.byol is not None:
            terms["loss_byol"] = self.byol(model, out.view_embeds, targets)
        if self.swav is not None:
            terms.update(self.swav(model, out.view_embeds, pair_out.image_embeds, pair_out.text_embeds))
        loss = sum(terms.values())
        if out.view_embeds is not None:
            terms["view_std"] = gather_ids(out.view_embeds.detach().float()).std(dim=0).mean()
        return loss, terms

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
