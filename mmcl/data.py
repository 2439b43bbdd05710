"""Image–caption data: load any supported source as a `datasets.Dataset`, decode images lazily,
skip (and count) the ones that cannot be read, tokenize captions in the collator.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import datasets
import torch
from PIL import Image

from .config import ConfigError, DataConfig

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mmcl"


def _pick_split(dsd: datasets.DatasetDict, split: str, spec: str) -> datasets.Dataset:
    if split in dsd:
        return dsd[split]
    if len(dsd) == 1:  # a single-split folder or file: use what is there
        return next(iter(dsd.values()))
    raise ConfigError(f"{spec} has no split '{split}'; it has: {', '.join(dsd)}")


def _resolve_paths(ds: datasets.Dataset, column: str, base: Path) -> datasets.Dataset:
    """Relative image paths in a csv/json/parquet file are relative to that file, not to the cwd."""
    if column not in ds.column_names or ds.features[column].dtype not in ("string", "large_string"):
        return ds

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        batch[column] = [p if p is None or os.path.isabs(p) else str(base / p) for p in batch[column]]
        return batch

    return ds.map(resolve, batched=True, desc=None)


def load_source(spec: str, split: str, cfg: DataConfig) -> datasets.Dataset:
    """One split of a data source; see `DataConfig` for the accepted forms of `spec`."""
    try:
        return _load_utf8(spec, split, cfg)
    except ValueError as err:
        # datasets' own words for an empty file are misleading ("Instruction 'train' corresponds to no data")
        if "corresponds to no data" in str(err):
            raise ConfigError(f"{spec}: the dataset has no rows") from err
        raise



# --- Caption files that are not UTF-8 (a CSV saved as latin-1): name the file, not a traceback ----------

def _load_utf8(spec: str, split: str, cfg: DataConfig) -> datasets.Dataset:
    """`_load_source`, with a clear error naming the file when a text file is not UTF-8.

    datasets raises DatasetGenerationError (csv, tsv, an imagefolder's metadata.jsonl) or a bare
    UnicodeDecodeError (an imagefolder's metadata.csv). pyarrow's JSON reader keeps the invalid bytes
    and fails only when a row is read, in the middle of training: so JSON tables are validated here.
    """
    try:
        ds = _load_source(spec, split, cfg)
        if Path(spec).suffix.lower() in (".json", ".jsonl"):
            ds.data.table.validate(full=True)  # a linear scan; raises ArrowInvalid on bad UTF-8
        return ds
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause: BaseException | None = err
        while cause is not None and not (isinstance(cause, UnicodeDecodeError) or "Invalid UTF8" in str(cause)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        path = Path(spec)
        files = sorted(str(p) for p in path.rglob("metadata.*")) if path.is_dir() else [spec]
        raise ConfigError(f"{', '.join(files) or spec}: not UTF-8 text ({cause}); mmcl reads text files as "
                          f"UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from err


def _load_source(spec: str, split: str, cfg: DataConfig) -> datasets.Dataset:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "emoji":
            raise ConfigError(f"unknown built-in dataset '{spec}'; the built-in one is 'builtin:emoji'")
        from .emoji_data import build_emoji_dataset

        return _pick_split(build_emoji_dataset(cfg.cache_dir or default_cache_dir() / "datasets",
                                               image_size=cfg.emoji_image_size), split, spec)
    path = Path(spec)
    if path.is_dir() and any((path / m).exists() for m in DISK_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except IndexError as err:  # what datasets raises for a saved table with no rows
            raise ConfigError(f"{spec}: the dataset has no rows") from err
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, split, spec)
        return loaded
    if path.is_dir():
        return _pick_split(datasets.load_dataset("imagefolder", data_dir=str(path)), split, spec)
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train", **kwargs)
        return _resolve_paths(ds, cfg.image_column, path.resolve().parent)
    if path.exists():
        raise ConfigError(f"{spec}: not a dataset folder or a .csv/.jsonl/.json/.parquet file")
    return datasets.load_dataset(spec, cfg.dataset_config, split=split)


def check_columns(ds: datasets.Dataset, cfg: DataConfig, spec: str) -> datasets.Dataset:
    """Training data: the image and caption columns must exist (see `require_columns`)."""
    needed = {getattr(cfg, key): f"(data.{key})" for key in ("image_column", "caption_column")}
    return require_columns(ds, spec, cfg.image_column, needed)


def require_columns(ds: datasets.Dataset, name: str, image_column: str, needed: dict[str, str]) -> datasets.Dataset:
    """Fail at start, naming the source, the missing column, why it is needed (`needed`: column ->
    reason) and the columns that exist; fail on no rows; leave the images undecoded."""
    for column, why in needed.items():
        if column not in ds.column_names:
            raise ConfigError(f"{name}: no column '{column}' {why}; columns are: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise ConfigError(f"{name}: the dataset has no rows")
    if isinstance(ds.features[image_column], datasets.Image):
        # decode ourselves, lazily, so that one corrupt file is skipped instead of crashing
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def read_image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of an image cell (path or {"bytes", "path"} dict); None for a PIL image."""
    if isinstance(value, dict):
        return value.get("bytes") or Path(value["path"]).read_bytes()
    if isinstance(value, (str, os.PathLike)):
        return Path(value).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        return None
    raise ValueError(f"not an image: {type(value).__name__}")


def load_image(value: Any, min_size: int | None = None) -> Image.Image:
    """An image cell (path, {"bytes", "path"} dict, encoded bytes or PIL image) -> an RGB image.

    Transparent images are composited on white (emoji, logos); grayscale, palette, CMYK and
    16-bit images are converted. Raises on a missing, unreadable or corrupt file, and on one
    over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, not twice it). With `min_size`, a JPEG much larger than needed is
    decoded at a reduced scale (1/2, 1/4, 1/8: Pillow's draft mode), never below `min_size` px
    on its shorter side: the processor resizes it anyway, and decoding is the costly part.
    """
    data = read_image_bytes(value)
    image = value if data is None else Image.open(io.BytesIO(data))  # reads the header only
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.size[0] * image.size[1] > limit:
        # Pillow only warns between 1x and 2x its limit; mmcl skips all of those: one such image
        # decoded to RGB costs gigabytes in a worker. (Checked by hand: warning filters are global
        # and not thread-safe, and streaming decodes in threads.)
        raise Image.DecompressionBombError(f"Image size ({image.size[0] * image.size[1]} pixels) exceeds the "
                                           f"limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)")
    if min_size and image.format == "JPEG":
        width, height = image.size
        scale = min(width, height) / min_size
        image.draft("RGB", (max(1, round(width / scale)), max(1, round(height / scale))))
    image.load()  # decode now: truncated files fail here, not later
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit
    return image.convert("RGB")


def processor_min_size(image_processor: Any) -> int | None:
    """The smallest side an image processor resizes to (None when unknown)."""
    size = getattr(image_processor, "size", None) or {}
    sides = [v for k, v in dict(size).items() if k in ("height", "width", "shortest_edge") and isinstance(v, int)]
    return min(sides) if sides else None


def stable_id(data: bytes) -> int:
    """A 63-bit id of some bytes, the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)


def make_pair(cell: Any, caption_cell: Any, image_processor: Any, seed_key: str, augment: Any = None,
              min_size: int | None = None, fallback_id: bytes = b"") -> dict[str, Any]:
    """One training example from an image cell and a caption cell (raises if either is unusable).

    The randomness (augmentation, which caption of several) comes from `seed_key`, so it does not
    depend on workers or processes. `image_id` hashes the image bytes (`fallback_id` for an
    in-memory image): the same file in two rows is one image, and ClipLoss masks twins.
    """
    captions = caption_list(caption_cell)
    if not captions:
        raise ValueError(f"empty or non-text caption {caption_cell!r}")
    rng = random.Random(zlib.crc32(seed_key.encode()))
    data = read_image_bytes(cell)
    image = load_image(cell if data is None else data, min_size)
    if augment is not None:
        image = augment(image, rng)
    caption = rng.choice(captions)
    return {"pixel_values": image_processor(image, return_tensors="pt")["pixel_values"][0], "caption": caption,
            "image_id": stable_id(data if data is not None else fallback_id),
            "text_id": stable_id(caption.encode("utf-8"))}


class Skipped(NamedTuple):
    row: int
    source: str  # the file path, or "<bytes>" for embedded images
    reason: str


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

    def __init__(self, ds: datasets.Dataset, image_column: str, caption_column: str,
                 image_processor: Any, seed: int = 0, max_tries: int = 64, augment: Any = None) -> None:
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.image_processor, self.seed, self.epoch, self.max_tries = image_processor, seed, 0, max_tries
        self.augment = augment  # (PIL image, random.Random) -> PIL image, or None
        self.min_size = processor_min_size(image_processor)

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, row: int) -> dict[str, Any]:
        example = self.ds[row]
        item = make_pair(example[self.image_column], example[self.caption_column], self.image_processor,
                         f"{self.seed}/{self.epoch}/{row}", self.augment, self.min_size, f"row:{row}".encode())
        return {**item, "row": row}

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[Skipped] = []
        for attempt in range(self.max_tries):
            row = (index + attempt) % len(self.ds)
            try:
                item = self._load(row)
            except Exception as err:  # any undecodable file must not stop training
                try:
                    source = _describe(self.ds[row][self.image_column])
                except Exception:  # the row itself could not be read
                    source = f"<row {row}>"
                skipped.append(Skipped(row, source, f"{type(err).__name__}: {err}"[:200]))
                continue
            return {**item, "skipped": skipped}
        raise RuntimeError(f"{self.max_tries} consecutive unreadable rows from row {index}; "
                           f"first: {skipped[0].source} ({skipped[0].reason})")


@dataclass
class PairCollator:
    """Stacks pixels and tokenizes the captions of a batch (padded to the longest, truncated)."""

    tokenizer: Any
    max_length: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        text = self.tokenizer([it["caption"] for it in items], padding="longest", truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "pixel_values": torch.stack([it["pixel_values"] for it in items])}
        batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        batch["text_ids"] = torch.tensor([it["text_id"] for it in items], dtype=torch.long)
        batch["skipped"] = [s for it in items for s in it["skipped"]]
        return batch


def iter_captions(ds: datasets.Dataset, column: str, limit: int = 200_000) -> Iterator[str]:
    """Captions of the first `limit` rows, for training a tokenizer."""
    for cell in ds.select_columns([column]).select(range(min(limit, len(ds))))[column]:
        yield from caption_list(cell)
