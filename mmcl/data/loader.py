"""The training data as a run reads it: the training split (map-style through a DataLoader, or a
stream), and `TrainBatches`, which yields batches from any optimizer step on, epoch after epoch, so
that a resumed run reads exactly the batches the interrupted one would have."""

from __future__ import annotations

import math
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from ..config import ConfigError, DataConfig
from .clusters import ClusterBatchSampler
from .pairs import PairCollator, PairDataset, PairRecipe, iter_captions
from .sources import load_pairs, load_stream, require_columns
from .streaming import StreamingPairs, stream_captions


def load_train_dataset(data: DataConfig, negative_column: str | None, accelerator: Accelerator) -> Any:
    """`data.train` as a `datasets.Dataset` (or an `IterableDataset` when `data.streaming`), with the
    hard-negative column checked when the loss reads one."""
    if data.streaming:
        return load_stream(data.train_source())
    with accelerator.main_process_first():  # a built-in dataset is built once, then read
        ds = load_pairs(data.train_source(), data.cache_dir, data.emoji_image_size)
    if negative_column:
        require_columns(ds, data.train_source(), {negative_column: "(loss.hard_negative_column; `mmcl data "
                                                                   "mine-negatives` writes one)"})
    return ds


def hold_out(ds: datasets.Dataset, data: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """With no `data.validation`: `data.validation_share` of the training images, drawn with `seed`,
    become the held-out set (every row of one image goes the same way: rows share an image when their
    image column holds the same path); the rest trains. Returns (train, held out or None)."""
    if data.validation or data.validation_share <= 0 or not isinstance(ds, datasets.Dataset):
        return ds, None
    if not 0.0 < data.validation_share < 1.0:
        raise ConfigError(f"data.validation_share is {data.validation_share}: give a share in [0, 1)")
    keys = ds[data.image_column] if shares_images(ds, data.image_column) else list(range(len(ds)))
    images = list(dict.fromkeys(keys))
    count = math.ceil(data.validation_share * len(images))
    if count >= len(images):
        raise ConfigError(f"{data.train}: {len(images)} image(s) is too few to hold out "
                          f"data.validation_share={data.validation_share} and train on the rest; add rows, or name "
                          "held-out data with data.validation")
    held = {images[i] for i in np.random.default_rng(seed).permutation(len(images))[:count].tolist()}
    rows = np.fromiter((k in held for k in keys), dtype=bool, count=len(keys))
    return ds.select(np.flatnonzero(~rows)), ds.select(np.flatnonzero(rows))


def shares_images(ds: datasets.Dataset, column: str) -> bool:
    """Whether `column` holds image paths (strings), so that rows naming one path are one image."""
    feature = ds.features.get(column)
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def fit_batch(rows: int, batch_size: int, num_processes: int, name: str) -> tuple[int, str | None]:
    """A per-process batch that fits a dataset of `rows` (a stream: the rows counted up to one batch):
    unchanged when a global batch fits, else the largest that does, with the line that says so. A batch
    never repeats a row."""
    if rows >= batch_size * num_processes:
        return batch_size, None
    fitted = rows // num_processes
    if fitted < 2:
        raise ConfigError(f"{name}: {rows} readable row(s) for {num_processes} process(es) cannot make a contrastive "
                          "batch (at least 2 pairs per process): add rows")
    return fitted, (f"{name} has {rows} rows, less than one global batch of {batch_size} x {num_processes}: "
                    f"training with train.per_device_batch_size={fitted} (set it to choose)")


def count_up_to(ds: datasets.IterableDataset, limit: int) -> int:
    """How many examples a stream has, counting no further than `limit`."""
    return sum(1 for _ in ds.take(limit))


def train_captions(ds: Any, data: DataConfig) -> Iterator[str]:
    """The training captions (a lazy iterator), to train a tokenizer on."""
    return stream_captions(ds, data) if data.streaming else iter_captions(ds, data.caption_column)


def build_train_loader(ds: Any, data: DataConfig, recipe: PairRecipe, collator: PairCollator, batch_size: int,
                       seed: int, cluster_labels: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    """Shuffled batches of `batch_size` pairs (the last partial one dropped); with `cluster_labels`
    (`data.batch_sampler: cluster`), each batch drawn from `data.clusters_per_batch` clusters."""
    dataset = PairDataset(ds, data.image_column, data.caption_column, recipe, seed=seed)
    if cluster_labels is not None:  # each batch from a few clusters: hard in-batch negatives
        sampler = ClusterBatchSampler(cluster_labels, batch_size, data.clusters_per_batch, seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                           num_workers=data.num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collator, num_workers=data.num_workers, persistent_workers=False)


def build_stream(ds: Any, data: DataConfig, recipe: PairRecipe, collator: PairCollator, batch_size: int, seed: int,
                 accelerator: Accelerator) -> StreamingPairs:
    """This process's part of the stream, in batches of `batch_size` (not through Accelerate)."""
    return StreamingPairs(ds, data, recipe, collator, batch_size, seed, accelerator.process_index,
                          accelerator.num_processes)


class TrainBatches:
    """The batches of a run from a given point on, endlessly: a prepared DataLoader epoch after epoch,
    or a stream (which keeps its own position, saved in checkpoints).

    `accumulation` micro-batches make one optimizer step; `steps_per_epoch` counts optimizer steps."""

    def __init__(self, accelerator: Accelerator, loader: Any = None, stream: StreamingPairs | None = None,
                 accumulation: int = 1) -> None:
        self.accelerator, self.loader, self.stream, self.accumulation = accelerator, loader, stream, accumulation
        self.steps_per_epoch = 0 if loader is None else math.ceil(len(loader) / accumulation)
        self.num_workers = stream.cfg.num_workers if stream is not None else loader.num_workers

    def after(self, steps_read: int) -> Iterator[dict[str, Any]]:
        """Batches after the first `steps_read` optimizer steps' worth (skipped updates read theirs too)."""
        if self.stream is not None:
            for batch in self.stream:
                yield send_to_device(batch, self.accelerator.device)
            return
        epoch, done = divmod(steps_read, self.steps_per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            self.loader.dataset.set_epoch(epoch)
            if done:
                yield from self._rest_of_epoch(done * self.accumulation)
            else:
                yield from self.loader
            epoch, done = epoch + 1, 0

    def _rest_of_epoch(self, consumed: int) -> Iterator[dict[str, Any]]:
        """The rest of an epoch a checkpoint was taken in. Starting a DataLoader's iterator draws its
        base seed from torch's global RNG, which the uninterrupted run drew at the epoch's start, long
        before: that draw is undone, so dropout masks go on from the RNG state the checkpoint restored."""
        batches = iter(self.accelerator.skip_first_batches(self.loader, consumed))
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
