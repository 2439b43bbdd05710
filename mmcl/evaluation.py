"""Embedding a dataset with a dual encoder, and the retrieval evaluation run during training.

Every rank embeds its shard; `gather_for_metrics` reassembles the rows in order without the
padding duplicates, so the metrics are the same with any number of processes.
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets
import torch
from accelerate import Accelerator

from .data import _captions, load_image
from .metrics import retrieval_metrics


class _Images(torch.utils.data.Dataset):
    """Preprocessed images; an unreadable one comes back as zeros with valid=False."""

    def __init__(self, ds: datasets.Dataset, column: str, image_processor: Any) -> None:
        self.ds, self.column, self.image_processor = ds, column, image_processor

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = load_image(self.ds[i][self.column])
            pixels = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
            return {"pixel_values": pixels, "valid": True}
        except Exception:  # counted by the caller through `valid`
            return {"pixel_values": None, "valid": False}


def _collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    shape = next((it["pixel_values"].shape for it in items if it["valid"]), None)
    zeros = torch.zeros(shape) if shape is not None else torch.zeros(3, 1, 1)
    pixels = [it["pixel_values"] if it["valid"] else zeros for it in items]
    return {"pixel_values": torch.stack(pixels), "valid": torch.tensor([it["valid"] for it in items])}


@torch.no_grad()
def embed_images(model: Any, ds: datasets.Dataset, column: str, image_processor: Any,
                 accelerator: Accelerator, batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, D) image embeddings (rows of unreadable images are zeros) and the (N,) valid mask."""
    loader = torch.utils.data.DataLoader(_Images(ds, column, image_processor), batch_size=batch_size,
                                         collate_fn=_collate_images, num_workers=num_workers)
    loader = accelerator.prepare_data_loader(loader)
    embeds, valid = [], []
    for batch in loader:
        with accelerator.autocast():
            out = model.get_image_features(batch["pixel_values"]).float()
        out = out * batch["valid"].unsqueeze(1)
        e, v = accelerator.gather_for_metrics((out, batch["valid"]))
        embeds.append(e.cpu())
        valid.append(v.cpu())
    return torch.cat(embeds), torch.cat(valid)


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], tokenizer: Any, max_length: int,
                accelerator: Accelerator, batch_size: int) -> torch.Tensor:
    """-> (N, D) text embeddings, in the order of `texts`."""
    def collate(batch: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(batch), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    loader = accelerator.prepare_data_loader(
        torch.utils.data.DataLoader(list(texts), batch_size=batch_size, collate_fn=collate))
    embeds = []
    for batch in loader:
        with accelerator.autocast():
            out = model.get_text_features(batch["input_ids"], batch["attention_mask"]).float()
        embeds.append(accelerator.gather_for_metrics(out).cpu())
    return torch.cat(embeds)


def retrieval_evaluation(model: Any, ds: datasets.Dataset, image_column: str, caption_column: str,
                         tokenizer: Any, image_processor: Any, accelerator: Accelerator, *,
                         max_length: int, batch_size: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image retrieval over every caption of every readable image.

    Rows with an unreadable image, and their captions, are left out and counted in
    `skipped_images`. A row with several captions is one image with several correct texts.
    """
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    image_embeds, valid = embed_images(model, ds, image_column, image_processor, accelerator, batch_size)
    captions = [_captions(cell) for cell in ds[caption_column]]
    keep = valid & torch.tensor([bool(c) for c in captions])
    texts, text_to_image = [], []
    for image_index, row in enumerate(keep.nonzero().flatten().tolist()):
        texts += captions[row]
        text_to_image += [image_index] * len(captions[row])
    text_embeds = embed_texts(model, texts, tokenizer, max_length, accelerator, batch_size)
    metrics = retrieval_metrics(image_embeds[keep], text_embeds, torch.tensor(text_to_image), ks=ks)
    metrics.update(images=float(keep.sum()), texts=float(len(texts)), skipped_images=float((~valid).sum()))
    model.train(was_training)
    return metrics
