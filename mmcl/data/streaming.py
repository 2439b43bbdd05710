"""Streaming training data: WebDataset tar shards or a Hub dataset read as an `IterableDataset`.

Each process reads its own part of the stream (`split_dataset_by_node`: whole shards when they
divide evenly, else every world-th example), so no example is read by two processes and none is
left out. Images are decoded in a thread pool (`data.num_workers` threads; Pillow releases the GIL
while decoding) from the main process's read of the stream, so the position in the stream is
simply the number of examples read: a checkpoint stores it per process, and a resumed run skips
exactly that many (reading, not decoding, them) before continuing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import datasets

from ..config import ConfigError, DataConfig
from .images import stable_id
from .pairs import PairCollator, PairRecipe, Skipped, caption_list, make_pair
from .sources import IMAGE_KEYS

def pair_of(example: dict[str, Any], cfg: DataConfig) -> tuple[Any, Any]:
    """(image cell, caption cell) of one streamed example: named columns, or WebDataset's
    `<ext>` image and `json`/`txt` caption."""
    image = example.get(cfg.image_column)  # -> (image cell, caption cell)
    if image is None:
        image = next((example[k] for k in IMAGE_KEYS if example.get(k) is not None), None)
    if cfg.caption_column in example:
        cell = example[cfg.caption_column]
    elif isinstance(example.get("json"), dict):  # mmcl data convert writes the key "caption"
        meta = example["json"]
        cell = meta.get(cfg.caption_column, meta.get("caption"))
    else:
        cell = example.get("txt")
    if image is None:  # skipped and counted like any unreadable image
        raise ValueError(f"no image in this example (keys: {', '.join(example)}); set data.image_column")
    return image, cell


def stream_captions(ds: datasets.IterableDataset, cfg: DataConfig, limit: int = 50_000) -> Iterator[str]:
    """Captions of the stream's first examples, for training a tokenizer."""
    for example in ds.take(limit):
        try:
            yield from caption_list(pair_of(example, cfg)[1])
        except ValueError:  # an example without an image: its caption is still text
            continue


class StreamingPairs:
    """An endless iterator of training batches from a stream, epoch after epoch.

    `state_dict()` -> {"epoch", "read"}: the epoch and the number of examples this process has
    read in it; `load_state_dict` makes the next iteration continue right after them.
    """

    def __init__(self, ds: datasets.IterableDataset, cfg: DataConfig, recipe: PairRecipe, collator: PairCollator,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        from datasets.distributed import split_dataset_by_node

        if cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)  # shard order and a buffer
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.cfg, self.recipe, self.collator, self.batch_size, self.seed = cfg, recipe, collator, batch_size, seed
        self.epoch, self.read = 0, 0
        self.pool = ThreadPoolExecutor(max(1, cfg.num_workers))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "read": self.read}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.read = int(state["epoch"]), int(state["read"])

    def _decode(self, item: tuple[int, int, dict[str, Any]]) -> dict[str, Any] | Skipped:
        epoch, index, example = item
        key = str(example.get("__key__", index))
        try:
            cell, caption_cell = pair_of(example, self.cfg)
            pair = make_pair(cell, caption_cell, self.recipe, f"{self.seed}/{epoch}/{key}", key.encode())
            if self.recipe.negative_column:
                pair["negatives"] = caption_list(example.get(self.recipe.negative_column))
        except Exception as err:  # a bad example is skipped and counted, never a crash
            source = f"{example.get('__url__', 'stream')}#{key}"
            return Skipped(stable_id(source.encode()), source, f"{type(err).__name__}: {err}"[:200])
        meta = example.get("json") if isinstance(example.get("json"), dict) else {}
        if meta.get("image_id") is not None:  # rows of one image (convert --image-id-column) share it
            pair["image_id"] = stable_id(str(meta["image_id"]).encode())
        return {**pair, "row": index, "epoch": epoch, "skipped": []}

    def _examples(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, index in the epoch, example) from the saved position on, epoch after epoch."""
        epoch, start = self.epoch, self.read
        while True:
            self.ds.set_epoch(epoch)
            count = 0
            for count, example in enumerate(self.ds, start=1):
                if count > start:  # a resumed run passes over what was read before
                    yield epoch, count - 1, example
            if count == 0:
                raise ConfigError("the training stream has no examples for this process")
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        examples = self._examples()
        ready: list[dict[str, Any]] = []
        skipped: list[Skipped] = []
        bad_in_a_row = drops = 0
        while True:
            chunk = [next(examples) for _ in range(self.batch_size - len(ready))]
            epoch = chunk[-1][0]
            if chunk[0][0] != epoch or (ready and ready[0]["epoch"] != epoch):
                # an epoch ended inside this batch: its partial batch is dropped (as a DataLoader's last
                # one is), so that no batch holds two epochs' reads of one example
                drops += 1
                if drops > 2:  # epoch after epoch without one whole batch
                    raise ConfigError(f"this process's part of the training stream has fewer readable examples "
                                      f"than one batch ({self.batch_size}): lower train.per_device_batch_size")
                ready, chunk = [], [item for item in chunk if item[0] == epoch]
            for out in self.pool.map(self._decode, chunk):
                (skipped.append if isinstance(out, Skipped) else ready.append)(out)
                bad_in_a_row = bad_in_a_row + 1 if isinstance(out, Skipped) else 0
            if bad_in_a_row >= max(1000, 10 * self.batch_size):
                first = skipped[0]
                raise RuntimeError(f"{bad_in_a_row} unreadable examples in a row in the training stream; "
                                   f"first: {first.source} ({first.reason})")
            self.epoch, self.read = chunk[-1][0], chunk[-1][1] + 1  # the position after this chunk
            if len(ready) == self.batch_size:
                ready[0] = {**ready[0], "skipped": skipped}
                yield self.collator(ready)
                ready, skipped, drops = [], [], 0
