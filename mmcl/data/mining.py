"""`mmcl data mine-negatives`: give each row the captions of the images a model finds most like its own.

For every usable row (a readable image and a caption, exactly the rows `mmcl data convert` keeps),
a model embeds the image; the k most similar *other* images by cosine similarity give their first
caption each, written as a new `list[str]` column (default `hard_negatives`). Training reads that
column (`loss.hard_negative_column`) and adds those captions to the row's candidates: negatives
that look right at a glance are the ones a contrastive model learns the most from.

Twins are never negatives, as in the losses: a neighbour is passed over, and the search goes further
down the ranking, when it is the same image (equal bytes: the `stable_id` that training uses as
`image_id`), when its caption is one of the row's own captions, or when its caption is already among
the row's negatives. A row with fewer than k such neighbours gets what there is (counted in the
summary; training pads the short rows).

Similarities are computed `block_size` query rows at a time: memory O(block_size x N), never N x N.
The output is a `save_to_disk` folder with every original column, the images embedded as bytes
(as `mmcl data convert --to hf` writes them), written atomically: `--data.train=OUT` trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accelerate import Accelerator

from ..artifacts import atomic_dir
from ..config import ConfigError, SourceSpec
from .convert import ConvertResult, open_source, save_embedded, usable_rows
from .embed import Embedder, embed_images
from .images import stable_id
from .pairs import caption_list


@dataclass
class MiningResult(ConvertResult):
    """What `mine_negatives` wrote and skipped; `short`: rows that got fewer than k negatives."""

    model: str = ""
    k: int = 4
    column: str = "hard_negatives"
    short: int = 0

    def summary(self) -> str:
        skipped = (f" ({', '.join(f'{kind} {n:,}' for kind, n in self.skipped_kinds.items())})"
                   if self.skipped else "")
        short = f"; {self.short:,} with fewer than {self.k} (too few other images and captions)" if self.short else ""
        return (f"mined {self.k} hard negatives per row with {self.model}: {self.source} -> {self.out_dir} "
                f"(column '{self.column}'), {self.written:,} of {self.rows:,} rows written, "
                f"{self.skipped:,} skipped{skipped}{short}")


def _caption_ids(captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the id of each row's first caption (N,), the ids of each row's captions padded with -1 (N, L)):
    equal text, equal id."""
    ids: dict[str, int] = {}
    own = [[ids.setdefault(c, len(ids)) for c in row] for row in captions]
    width = max(map(len, own))
    padded = torch.tensor([row + [-1] * (width - len(row)) for row in own], dtype=torch.long)
    return padded[:, 0], padded


def _twins(image_ids: torch.Tensor, first: torch.Tensor, own: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, N) True where candidate j can never be a negative of query row start + b: the row itself,
    the same image, or a first caption equal to one of the row's own captions."""
    mask = image_ids[start:stop, None] == image_ids[None, :]
    for column in own[start:stop].T:  # (B,) one caption slot of every query row; -1 matches nothing
        mask |= column[:, None] == first[None, :]
    mask[torch.arange(stop - start), torch.arange(start, stop)] = True
    return mask


def _distinct(order: list[int], values: list[float], first: list[int], k: int) -> list[int]:
    """The first k candidates (in ranking order) with a caption not taken yet; -inf ends the list."""
    chosen, taken = [], set()
    for j, value in zip(order, values):
        if value == float("-inf") or len(chosen) == k:
            break
        if first[j] not in taken:
            taken.add(first[j])
            chosen.append(j)
    return chosen


def _pick(sims: torch.Tensor, first: list[int], k: int) -> list[list[int]]:
    """Per query row of `sims` (B, N, twins at -inf), its up to k negatives, most similar first.
    A top-(2k + 8) is almost always enough; a row that needs more is sorted in full."""
    depth = min(sims.shape[1], 2 * k + 8)
    values, order = sims.topk(depth, dim=1)  # (B, depth), best first
    values, order = values.tolist(), order.tolist()
    picked = []
    for i in range(len(sims)):
        row = _distinct(order[i], values[i], first, k)
        if len(row) < k and depth < sims.shape[1] and values[i][-1] > float("-inf"):  # look further down
            full_values, full_order = sims[i].sort(descending=True)
            row = _distinct(full_order.tolist(), full_values.tolist(), first, k)
        picked.append(row)
    return picked


def hard_negatives(embeds: torch.Tensor, image_ids: torch.Tensor, captions: list[list[str]], k: int,
                   block_size: int = 4096) -> list[list[int]]:
    """For each row, the rows of its (up to) k nearest other images whose first caption may be its
    negative, most similar first.

    embeds: (N, D) unit-norm image embeddings. image_ids: (N,) equal for equal image bytes.
    captions: each row's captions (at least one); a neighbour offers its first.
    A candidate is passed over when it is the row itself, the same image, when its first caption is
    one of the row's captions or already taken by a nearer neighbour. Cosine similarities are
    computed block_size query rows at a time against all N: memory O(block_size x N).
    """
    if k < 1 or block_size < 1:
        raise ConfigError(f"k and block_size must be at least 1, not {k} and {block_size}")
    first, own = _caption_ids(captions)
    image_ids, first_list = torch.as_tensor(image_ids, device=embeds.device), first.tolist()
    first, own = first.to(embeds.device), own.to(embeds.device)
    picked: list[list[int]] = []
    for start in range(0, len(embeds), block_size):
        stop = min(start + block_size, len(embeds))
        sims = embeds[start:stop].float() @ embeds.float().T  # (B, N)
        sims[_twins(image_ids, first, own, start, stop)] = float("-inf")
        picked += _pick(sims, first_list, k)
    return picked


def mine_negatives(source: SourceSpec, bundle: Embedder, accelerator: Accelerator, out_dir: str | Path,
                   k: int = 4, column: str = "hard_negatives", batch_size: int = 256, block_size: int = 4096,
                   num_workers: int = 0, cache_dir: str | None = None) -> MiningResult:
    """Write `source` with a column of k hard-negative captions per row (module docstring) to `out_dir`,
    the images embedded by `bundle` (a loaded model, `mmcl.towers.inference.load_encoder`, on
    `accelerator`'s device).

    Rows whose image cannot be decoded, or that have no caption, are skipped and counted in the
    result, as `mmcl data convert` skips them; `out_dir` must not exist or be empty.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    ds = open_source(source, out_dir, [], cache_dir)
    if column in ds.column_names:
        raise ConfigError(f"{source.dataset} already has a column '{column}'; name the new one with --column")
    result = MiningResult(source.dataset, str(out_dir), "hf", model=getattr(bundle, "name", ""), k=k, column=column)
    infos, captions = [], []
    for info, cells in usable_rows(ds, source, result, [source.caption_column], num_workers, False):
        infos.append(info)
        captions.append(caption_list(cells[source.caption_column]))
    if not infos:
        raise ConfigError(f"{source.dataset}: no row has both a readable image and a caption; nothing to mine")
    embeds, valid = embed_images(bundle, ds.select([info.row for info in infos]), source.image_column, accelerator,
                                 batch_size, num_workers, progress=True)
    keep = _keep_embedded(infos, valid, result)
    image_ids = [info.image_id if info.image_id is not None else stable_id(f"row:{info.row}".encode())
                 for info in infos]  # an in-memory image has no bytes: its own id, as in training
    captions = [captions[i] for i in keep]
    neighbours = hard_negatives(embeds[keep].to(accelerator.device), torch.tensor([image_ids[i] for i in keep]),
                                captions, k, block_size)
    negatives = [[captions[j][0] for j in row] for row in neighbours]
    result.short = sum(len(row) < k for row in negatives)
    if accelerator.is_main_process:
        _write(ds.select([infos[i].row for i in keep]), negatives, source.image_column, column, out_dir, result)
    accelerator.wait_for_everyone()
    return result


def _keep_embedded(infos: list[Any], valid: torch.Tensor, result: MiningResult) -> list[int]:
    """Indices of the rows the model embedded; the others (an image its processor refused) are skipped."""
    keep = []
    for i, (info, ok) in enumerate(zip(infos, valid.tolist())):
        if ok:
            keep.append(i)
        else:
            result.skip(info, "not embeddable", "the model's image processor failed on it")
    if not keep:
        raise ConfigError(f"{result.source}: the model could embed none of the images")
    return keep


def _write(ds: Any, negatives: list[list[str]], image_column: str, column: str, out_dir: str | Path,
           result: MiningResult) -> None:
    import datasets

    ds = ds.add_column(column, negatives, feature=datasets.List(datasets.Value("string")))
    with atomic_dir(out_dir) as tmp:
        result.written = save_embedded(ds, image_column, tmp)
