"""Training pairs: one preprocessed image and one caption per row, decoded lazily; a row whose
image cannot be read or that has no caption is skipped, counted and reported, never a crash.
Captions are tokenized in the collator."""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch

from ..config import ConfigError, DataConfig, LossConfig
from .augment import Augment, build_augment
if TYPE_CHECKING:  # `datasets` (with pyarrow and pandas) is a large import: only what reads data pays it
    import datasets

from .images import MAX_IMAGE_BYTES, describe, load_image, processor_min_size, read_image_bytes, stable_id


@dataclass(frozen=True)
class PairRecipe:
    """How a row becomes a training example, the same for map-style and streamed data: built once
    per run (`from_config`) and handed to `make_pair`, `PairDataset` and `StreamingPairs`.

    image_processor: the vision tower's (resize, normalise). augment: `data.augment`'s preset, or
    None. views: SLIP's augmentation for two extra views of each image, or None. max_image_bytes: a
    larger image file is not read (`data.max_image_bytes`). negative_column: the column of each
    row's hard-negative captions (`loss.hard_negative_column`), or None.
    """

    image_processor: Any
    augment: Augment | None = None
    views: Augment | None = None
    max_image_bytes: int = MAX_IMAGE_BYTES
    negative_column: str | None = None
    min_size: int | None = field(init=False)  # the smallest side to decode a JPEG at (see __post_init__)

    def __post_init__(self) -> None:
        """A JPEG larger than needed decodes at a reduced scale (`load_image`), never below the side the
        processor resizes to, divided by the side of the smallest crop the augmentation may take: a
        crop of 30% of the area is then still resized down, not up."""
        side = processor_min_size(self.image_processor)
        crops = [a.scale[0] for a in (self.augment, self.views) if a is not None]
        if side and crops:
            side = math.ceil(side / math.sqrt(max(min(crops), 1e-3)))
        object.__setattr__(self, "min_size", side)

    @classmethod
    def from_config(cls, data: DataConfig, loss: LossConfig, image_processor: Any) -> "PairRecipe":
        views = None
        if loss.image_ssl_weight or loss.byol_weight or loss.swav_weight:  # SLIP's / BYOL's views: a stronger crop and jitter than data.augment's
            views = Augment(scale=(0.3, 1.0), flip=bool(data.augment_options.get("flip")), jitter=0.4)
        return cls(image_processor, build_augment(data.augment, data.augment_options), views, data.max_image_bytes,
                   loss.hard_negative_column)


def make_pair(cell: Any, caption_cell: Any, recipe: PairRecipe, seed_key: str, fallback_id: bytes = b"") -> dict[str, Any]:
    """One training example from an image cell and a caption cell (raises if either is unusable).

    The randomness (augmentation, which caption of several) comes from `seed_key`, so it does not
    depend on workers or processes. `image_id` hashes the image bytes (`fallback_id` for an
    in-memory image): the same file in two rows is one image, and ClipLoss masks twins. With
    `recipe.views`, also two augmented views of the image (`view_pixel_values`), for SLIP's term.
    """
    captions = caption_list(caption_cell)
    if not captions:
        raise ValueError(f"empty or non-text caption {caption_cell!r}")
    rng = random.Random(zlib.crc32(seed_key.encode()))
    data = read_image_bytes(cell, recipe.max_image_bytes)
    image = load_image(cell if data is None else data, recipe.min_size)
    decoded = image
    if recipe.augment is not None:
        image = recipe.augment(image, rng)
    caption = rng.choice(captions)
    processor = recipe.image_processor
    item = {"pixel_values": processor(image, return_tensors="pt")["pixel_values"][0], "caption": caption,
            "image_id": stable_id(data if data is not None else fallback_id),
            "text_id": stable_id(caption.encode("utf-8"))}
    if recipe.views is not None:
        views = [recipe.views(decoded, rng), recipe.views(decoded, rng)]
        item["view_pixel_values"] = processor(views, return_tensors="pt")["pixel_values"]
    return item


class Skipped(NamedTuple):
    row: int
    source: str  # the file path, or "<bytes>" for embedded images
    reason: str


class UnreadableRows(ConfigError):
    """Every row tried for one example was bad: the data, not one file, is broken."""


@dataclass
class SkipCounter:
    """Counts unreadable rows once each (a bad row is met again every epoch)."""

    rows: set[int] = field(default_factory=set)
    examples: list[Skipped] = field(default_factory=list)

    def add(self, items: list[Skipped]) -> None:
        for item in items:
            if item.row not in self.rows:
                self.rows.add(item.row)
                if len(self.examples) < 10:
                    self.examples.append(item)

    def summary(self) -> str:
        lines = [f"skipped {len(self.rows)} row(s) with an unreadable image or no usable caption"]
        lines += [f"  row {s.row}: {s.source} ({s.reason})" for s in self.examples]
        return "\n".join(lines)


def caption_list(cell: Any) -> list[str]:
    """A caption cell (a string, or a list of them) -> its non-empty captions; [] for None, NaN,
    numbers and other non-text values (a row with none is skipped)."""
    if isinstance(cell, str):
        cell = [cell]
    if not isinstance(cell, (list, tuple)):
        return []
    return [c.strip() for c in cell if isinstance(c, str) and c.strip()]


class PairDataset(torch.utils.data.Dataset):
    """Training pairs: (preprocessed image, one caption) per row.

    A row whose image cannot be read or whose caption is empty is replaced by the next readable
    row (deterministically, so batch shapes stay equal on every rank and resume is exact), and is
    reported in the item's `skipped` list. With several captions per row one is drawn at random,
    seeded by (seed, epoch, row) so that the draw does not depend on workers or processes.
    """

    def __init__(self, ds: datasets.Dataset, image_column: str, caption_column: str, recipe: PairRecipe,
                 seed: int = 0, max_tries: int = 64) -> None:
        self.ds, self.image_column, self.caption_column, self.recipe = ds, image_column, caption_column, recipe
        self.seed, self.epoch, self.max_tries = seed, 0, max_tries

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, row: int) -> dict[str, Any]:
        example = self.ds[row]
        item = make_pair(example[self.image_column], example[self.caption_column], self.recipe,
                         f"{self.seed}/{self.epoch}/{row}", f"row:{row}".encode())
        if self.recipe.negative_column:
            item["negatives"] = caption_list(example[self.recipe.negative_column])
        return {**item, "row": row}

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[Skipped] = []
        for attempt in range(self.max_tries):
            row = (index + attempt) % len(self.ds)
            try:
                item = self._load(row)
            except Exception as err:  # any undecodable file must not stop training
                try:
                    source = describe(self.ds[row][self.image_column])
                except Exception:  # the row itself could not be read
                    source = f"<row {row}>"
                skipped.append(Skipped(row, source, f"{type(err).__name__}: {err}"[:200]))
                continue
            return {**item, "skipped": skipped}
        raise UnreadableRows(f"data: {self.max_tries} consecutive rows from row {index} could not be read (of "
                             f"{len(self.ds)}); first: {skipped[0].source} ({skipped[0].reason}); `mmcl data check` "
                             "lists each bad row")


@dataclass
class PairCollator:
    """Stacks pixels and tokenizes the captions of a batch (truncated to `max_length`; padded to the
    batch's longest, or to `max_length` with padding="max_length").

    Items with hard-negative captions ("negatives"): their captions follow the B captions in
    `input_ids`, k per row (k = the most any row has; a row with fewer is padded with its own
    caption, which the loss masks as a twin), with `negative_text_ids` (B, k).
    """

    tokenizer: Any
    max_length: int
    padding: str = "longest"

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [it["caption"] for it in items]
        negatives = hard_negatives(items)
        text = self.tokenizer(captions + [c for row in negatives for c in row], padding=self.padding,
                              truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": torch.stack([it["pixel_values"] for it in items])}
        batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        batch["text_ids"] = torch.tensor([it["text_id"] for it in items], dtype=torch.long)
        if "view_pixel_values" in items[0]:  # rows 2i and 2i + 1: the views of image i
            batch["view_pixel_values"] = torch.cat([it["view_pixel_values"] for it in items])
        if negatives:
            batch["negative_text_ids"] = torch.tensor([[stable_id(c.encode("utf-8")) for c in row] for row in negatives],
                                                      dtype=torch.long)
        batch["skipped"] = [s for it in items for s in it["skipped"]]
        batch["rows"] = [it["row"] for it in items]  # named when the batch gives a non-finite loss
        return batch


def hard_negatives(items: list[dict[str, Any]]) -> list[list[str]]:
    """Each item's hard-negative captions, k per row (padded with the row's own caption); [] if none."""
    if not any("negatives" in it for it in items):
        return []
    k = max(len(it.get("negatives", [])) for it in items)
    return [(it.get("negatives", []) + [it["caption"]] * k)[:k] for it in items] if k else []


def iter_captions(ds: datasets.Dataset, column: str, limit: int = 200_000) -> Iterator[str]:
    """Captions of the first `limit` rows, for training a tokenizer."""
    for cell in ds.select_columns([column]).select(range(min(limit, len(ds))))[column]:
        yield from caption_list(cell)
