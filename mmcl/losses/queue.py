"""MoCo-style feature queue: embeddings of earlier steps, from a momentum (EMA) copy of the model,
kept as extra negatives for both directions.

He et al. 2020 (MoCo): a FIFO queue of keys from a slowly moving encoder lets the number of
negatives exceed the batch. Here both modalities are queued, as pairs: each step pushes the global
batch's image and text embeddings (gathered from every process, in rank order, so every rank holds
the same queue), and the pair ids travel with them so that a queued twin of a row's own image or
caption is never its negative. The queue, the EMA copy and the step count are buffers and
parameters of this module: they are saved in checkpoints and restored on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..towers.model import DualEncoderOutput
from .distributed import gather_ids
from .ema import ema_, frozen_copy
from .negatives import Negatives


class FeatureQueue(nn.Module):
    """`size` image and text embeddings of width `dim`, filled oldest-first, and (with momentum > 0)
    the EMA copy of `model` that produces them. Call `before_step` at the start of every micro-batch
    (it moves the copy once per optimizer step), `negatives()` for the current contents, then `push`."""

    def __init__(self, size: int, dim: int, momentum: float, model: nn.Module | None = None,
                 accumulation_steps: int = 1, blueprint: nn.Module | None = None) -> None:
        super().__init__()
        self.size, self.momentum, self.accumulation_steps = size, momentum, accumulation_steps
        for name, dtype, shape in (("images", torch.float32, (size, dim)), ("texts", torch.float32, (size, dim)),
                                   ("image_ids", torch.long, (size,)), ("text_ids", torch.long, (size,))):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        for name in ("filled", "head", "calls"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.momentum_model = None
        if momentum > 0:
            if model is None:
                raise ValueError("a momentum queue needs the model to copy")
            online = extract_model_from_parallel(model)
            self.momentum_model = frozen_copy(online, blueprint)  # sharded as the model is

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q on the first micro-batch of each optimizer step."""
        if self.momentum_model is not None and int(self.calls) % self.accumulation_steps == 0:
            ema_(self.momentum_model, extract_model_from_parallel(model), 1.0 - self.momentum)
        self.calls += 1

    def negatives(self) -> Negatives | None:
        n = int(self.filled)
        if n == 0:
            return None
        # copies: `push` overwrites the buffers before the loss's backward reads them
        return Negatives(texts=self.texts[:n].clone(), images=self.images[:n].clone(),
                         image_ids=self.image_ids[:n].clone(), text_ids=self.text_ids[:n].clone())

    @torch.no_grad()
    def keys(self, out: DualEncoderOutput, inputs: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (images, texts) to queue: the EMA copy's embeddings of `inputs` (the batch,
        in chunks), or the model's own detached ones with momentum 0."""
        if self.momentum_model is None:
            return out.image_embeds.detach(), out.text_embeds.detach()
        self.momentum_model.eval()
        outs = [self.momentum_model(**chunk) for chunk in inputs]
        return torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs])

    @torch.no_grad()
    def push(self, images: torch.Tensor, texts: torch.Tensor, image_ids: torch.Tensor | None,
             text_ids: torch.Tensor | None) -> None:
        """Add every process's rows (gathered here) after the oldest are dropped. A batch with a
        non-finite embedding (its update is skipped: `mmcl.training.loop.training_step`) is not queued: it
        would make every later loss NaN. Every process sees the same gathered rows, so all agree."""
        images, texts = gather_ids(images.float()), gather_ids(texts.float())
        if not bool(torch.isfinite(images).all() & torch.isfinite(texts).all()):
            return
        rows = len(images)
        image_ids = gather_ids(image_ids) if image_ids is not None else torch.full((rows,), -1, device=images.device)
        text_ids = gather_ids(text_ids) if text_ids is not None else torch.full((rows,), -2, device=images.device)
        start = max(0, rows - self.size)  # a batch larger than the queue: keep its newest rows
        index = (int(self.head) + torch.arange(rows - start, device=images.device)) % self.size
        for buffer, values in ((self.images, images), (self.texts, texts), (self.image_ids, image_ids),
                               (self.text_ids, text_ids)):
            buffer[index] = values[start:].to(buffer.dtype)
        self.head.copy_((self.head + rows - start) % self.size)
        self.filled.copy_(torch.clamp(self.filled + rows - start, max=self.size))
