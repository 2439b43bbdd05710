"""Candidates beyond the global batch (a queue of earlier embeddings, each row's hard-negative
captions) and the twin masks that keep a pair's own image or caption from being its negative."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def duplicate_mask(image_ids: torch.Tensor, text_ids: torch.Tensor, all_image_ids: torch.Tensor,
                   all_text_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) True where column j is not a true negative for row i: it shows the same image, or
    carries the identical caption, as pair i (and, where `targets` is given, is not pair i itself)."""
    same = (image_ids[:, None] == all_image_ids[None, :]) | (text_ids[:, None] == all_text_ids[None, :])
    if targets is not None:
        same[torch.arange(len(targets), device=targets.device), targets] = False
    return same


@dataclass
class Negatives:
    """Extra candidates for one rank's rows, all unit norm and without gradient unless noted.

    texts / images: (Q, D) queued embeddings, extra columns for every image row / text row;
    their pairs' ids (Q,) mask twins. row_texts: (B, k, D) each image row's own hard-negative
    captions (with gradient: they went through the text tower this step); row_text_ids (B, k).
    """

    texts: torch.Tensor | None = None
    images: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    row_texts: torch.Tensor | None = None
    row_text_ids: torch.Tensor | None = None

    def image_side(self, images: torch.Tensor, image_ids: torch.Tensor | None,
                   text_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cosines of each image row with its extra text candidates (B, Q + k), and where they are
        twins of the row's own pair (None: no twin)."""
        scores, masks = [], []
        if self.texts is not None and len(self.texts):
            scores.append(images @ self.texts.to(images.dtype).T)
            masks.append(self._queue_twins(image_ids, text_ids, len(self.texts)))
        if self.row_texts is not None:
            scores.append(torch.einsum("bd,bkd->bk", images, self.row_texts.to(images.dtype)))
            masks.append(None if text_ids is None or self.row_text_ids is None
                         else self.row_text_ids == text_ids[:, None])
        return _join(scores, masks)

    def text_side(self, texts: torch.Tensor, image_ids: torch.Tensor | None,
                  text_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cosines of each text row with the queued images (B, Q), and their twin mask."""
        if self.images is None or not len(self.images):
            return None, None
        return texts @ self.images.to(texts.dtype).T, self._queue_twins(image_ids, text_ids, len(self.images))

    def _queue_twins(self, image_ids: torch.Tensor | None, text_ids: torch.Tensor | None,
                     size: int) -> torch.Tensor | None:
        if image_ids is None or text_ids is None or self.image_ids is None or self.text_ids is None:
            return None
        return duplicate_mask(image_ids, text_ids, self.image_ids[:size], self.text_ids[:size])


def _join(scores: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not scores:
        return None, None
    if all(m is None for m in masks):
        return torch.cat(scores, dim=1), None
    full = [torch.zeros_like(s, dtype=torch.bool) if m is None else m for s, m in zip(scores, masks)]
    return torch.cat(scores, dim=1), torch.cat(full, dim=1)
