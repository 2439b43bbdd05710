"""Batch embedding of a dataset's images, or of a list of texts, through a loaded model.

The model comes as an `EncoderBundle` (`mmcl.towers.inference.load_encoder`; anything with the same
fields will do): its encoder is *called* (`encoder(pixel_values=...)`, `encoder(input_ids=...,
attention_mask=...)`), so during training it runs through the model that `accelerator.prepare`
returned, on every rank. Every rank embeds its shard; `gather_for_metrics` reassembles the rows in
order without the padding duplicates, so the result is the same with any number of processes.
Evaluation, the applications and the data tools that need a model (mining, clustering) embed here.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import datasets
import torch
from accelerate import Accelerator
from PIL import Image

from ..progress import progress as progress_bar
from .images import load_image, processor_min_size


class Embedder(Protocol):
    """What embedding needs of a model (`mmcl.towers.inference.EncoderBundle` has it)."""

    encoder: Any  # called with pixel_values or input_ids / attention_mask -> .image_embeds / .text_embeds
    tokenizer: Any
    image_processor: Any
    text_padding: str
    max_length: int


class _Images(torch.utils.data.Dataset):
    """Preprocessed images. An unreadable one comes back as a blank image with valid=False: every
    batch keeps its shape and runs through the model, as collective (DDP / FSDP) forwards need."""

    def __init__(self, ds: datasets.Dataset, column: str, image_processor: Any) -> None:
        self.ds, self.column, self.image_processor = ds, column, image_processor
        self.min_size = processor_min_size(image_processor)

    def __len__(self) -> int:
        return len(self.ds)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"pixel_values": self._pixels(load_image(self.ds[i][self.column], self.min_size)), "valid": True}
        except Exception:  # counted by the caller through `valid`
            side = self.min_size or 224
            return {"pixel_values": self._pixels(Image.new("RGB", (side, side), "white")), "valid": False}


def _collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "valid": torch.tensor([it["valid"] for it in items])}


def _shard(loader: torch.utils.data.DataLoader, accelerator: Accelerator) -> Any:
    """This process's share of `loader`, on its device. Not `accelerator.prepare_data_loader`:
    that keeps a reference to every loader it prepares, and evaluations run many times."""
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, accelerator.device, accelerator.num_processes, accelerator.process_index,
                               put_on_device=True)


LONG_WORK_S = 3.0  # an evaluation's embedding shows its progress once it has taken this long


def _bar(loader: Any, progress: bool, accelerator: Accelerator, unit: str) -> Any:
    if not progress:
        return loader
    return progress_bar(loader, desc=f"embedding {unit}", unit="batches", total=len(loader), delay=LONG_WORK_S,
                    disable=not accelerator.is_local_main_process)


@torch.no_grad()
def embed_images(bundle: Embedder, ds: datasets.Dataset, column: str, accelerator: Accelerator,
                 batch_size: int, num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, D) image embeddings (rows of unreadable images are zeros) and the (N,) valid mask."""
    loader = torch.utils.data.DataLoader(_Images(ds, column, bundle.image_processor), batch_size=batch_size,
                                         collate_fn=_collate_images, num_workers=num_workers)
    embeds, valid = [], []
    for batch in _bar(_shard(loader, accelerator), progress, accelerator, "images"):
        with accelerator.autocast():
            out = bundle.encoder(pixel_values=batch["pixel_values"]).image_embeds.float()
        out = out * batch["valid"].unsqueeze(1)
        e, v = accelerator.gather_for_metrics((out, batch["valid"]))
        embeds.append(e.cpu())
        valid.append(v.cpu())
    return torch.cat(embeds), torch.cat(valid)


@torch.no_grad()
def embed_texts(bundle: Embedder, texts: Sequence[str], accelerator: Accelerator, batch_size: int,
                progress: bool = False) -> torch.Tensor:
    """-> (N, D) text embeddings, in the order of `texts`."""
    def collate(batch: list[str]) -> dict[str, torch.Tensor]:
        enc = bundle.tokenizer(list(batch), padding=bundle.text_padding, truncation=True,
                               max_length=bundle.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask")}

    loader = _shard(torch.utils.data.DataLoader(list(texts), batch_size=batch_size, collate_fn=collate), accelerator)
    embeds = []
    for batch in _bar(loader, progress, accelerator, "texts"):
        with accelerator.autocast():
            out = bundle.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        embeds.append(accelerator.gather_for_metrics(out.text_embeds.float()).cpu())
    return torch.cat(embeds)
