"""Hard in-batch negatives by clustering: batches drawn from a few clusters of similar images.

A contrastive batch's negatives are the other rows of the (global) batch. Drawn at random, most of
them are easy: a dog against a spreadsheet. `ClusterBatchSampler` builds each batch from
`clusters_per_batch` clusters of image embeddings (`kmeans` of a reference model's embeddings,
`cluster_labels`), so the negatives look alike and the loss has something to learn from.

Training uses it as `DataLoader(dataset, batch_sampler=ClusterBatchSampler(...))`. Accelerate shards
such a loader by handing whole batches to the processes in turn, so each process's batch comes from
`clusters_per_batch` clusters and the global batch from up to `num_processes * clusters_per_batch`.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..config import ConfigError
from .embed import Embedder, embed_images


# --- spherical k-means ------------------------------------------------------------------------------
def _init_centroids(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ on the sphere (as scikit-learn initialises): each next centroid is the best of
    2 + ln(k) points drawn with probability proportional to their cosine distance (1 - cos, half the
    squared Euclidean distance of unit vectors) to the nearest centroid so far; the best leaves the
    least total distance. Plain k-means++ often puts two seeds in one cluster when it draws the
    last ones. Draws come from `generator` (CPU) only: deterministic for a seed."""
    n, trials = len(x), 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = x @ x[chosen[0]]  # (N,) cosine to the nearest chosen centroid
    for _ in range(1, k):
        weights = (1 - closest).clamp_min(0).double().cumsum(0)  # (N,)
        u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device)
        if weights[-1] > 0:
            candidates = torch.searchsorted(weights, u * weights[-1], right=True).clamp_max(n - 1)
        else:  # every point sits on a centroid already: the duplicates make empty clusters, reseeded later
            candidates = (u * n).long()
        reached = torch.maximum(closest[:, None], x @ x[candidates].T)  # (N, trials)
        best = int((1 - reached).sum(0).argmin())
        chosen.append(int(candidates[best]))
        closest = reached[:, best]
    return x[chosen].clone()  # (K, D)


def _assign(x: torch.Tensor, centroids: torch.Tensor,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels (N,), cosine to the own centroid (N,), per-cluster sums of the points (K, D)), in
    blocks of rows: memory O(block_size x K). The sums are one-hot matmuls, not `index_add_`,
    whose atomic adds on a GPU make the result vary from run to run."""
    k = len(centroids)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    best = torch.empty(len(x), dtype=x.dtype, device=x.device)
    sums = torch.zeros_like(centroids)
    for start in range(0, len(x), block_size):
        block = x[start:start + block_size]  # (B, D)
        sim, label = (block @ centroids.T).max(dim=1)  # (B,)
        labels[start:start + block_size], best[start:start + block_size] = label, sim
        sums += F.one_hot(label, k).to(x.dtype).T @ block  # (K, D)
    return labels, best, sums


def kmeans(embeddings: torch.Tensor, num_clusters: int, seed: int = 0, iters: int = 50,
           block_size: int = 16384) -> torch.Tensor:
    """Spherical (cosine) k-means of unit-norm `embeddings` (N, D) -> cluster labels (N,) int64.

    Greedy k-means++ initialisation, then Lloyd iterations (assign each point to the centroid of
    highest cosine; centroid = the re-normalised mean of its points) until no label changes or
    `iters` rounds. A cluster that runs empty is reseeded with the point its centroid fits worst.
    Runs on the embeddings' device, `block_size` rows at a time: memory O(block_size x num_clusters)
    beside the embeddings. Every random draw comes from a CPU generator seeded with `seed`, so on the
    CPU the same input and seed give the same labels. Zero rows (unreadable images) take part
    without pulling any centroid. Like any k-means it can settle in a local optimum: greedy
    k-means++ makes that rare on well-separated clusters, not impossible.
    """
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ConfigError(f"kmeans needs a non-empty (N, D) tensor, not shape {tuple(embeddings.shape)}")
    if iters < 1 or block_size < 1:
        raise ConfigError(f"kmeans needs iters and block_size of at least 1, not {iters} and {block_size}")
    if not 1 <= num_clusters <= len(embeddings):
        raise ConfigError(f"num_clusters must be between 1 and the number of rows ({len(embeddings)}), "
                          f"not {num_clusters}")
    x = embeddings.float()
    generator = torch.Generator().manual_seed(seed)
    centroids, labels = _init_centroids(x, num_clusters, generator), None
    for _ in range(iters):
        new_labels, best, sums = _assign(x, centroids, block_size)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        empty = (torch.bincount(labels, minlength=num_clusters) == 0).nonzero().flatten()
        if len(empty):  # the worst-fitted points start the empty clusters
            sums[empty] = x[best.argsort(stable=True)[:len(empty)]]
        centroids = F.normalize(sums, dim=1)
    return labels


# --- the batch sampler ------------------------------------------------------------------------------
class _Epoch:
    """The epoch a `ClusterBatchSampler` draws. On several processes Accelerate wraps the batch
    sampler in a `BatchSamplerShard` and its `DataLoaderShard.set_epoch` then reaches only
    `batch_sampler.batch_sampler.sampler.set_epoch`: this object, exposed as the sampler's `.sampler`."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ClusterBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices, each drawn from `clusters_per_batch` clusters (hard in-batch negatives).

    Each epoch, every cluster's rows are shuffled and cut into chunks of
    `batch_size // clusters_per_batch` rows; the chunks are shuffled and every `clusters_per_batch`
    consecutive ones make a *cluster batch* (two chunks may come from the same cluster: then the
    batch touches fewer clusters). The rows left over (each cluster's last, incomplete chunk, and the
    chunks that do not make a whole batch) form *tail batches*, grouped by cluster in a shuffled
    cluster order: a tail batch may touch more than `clusters_per_batch` clusters (small clusters
    are all tail). Their number is at most `(num_clusters + clusters_per_batch) / clusters_per_batch`,
    whatever the data size. Cluster and tail batches are yielded in a shuffled order; with
    `drop_last=False` a last, incomplete tail batch comes at the very end (Accelerate expects only
    the last batch to be short), with `drop_last=True` it is dropped.

    Every row appears at most once per epoch (exactly once with `drop_last=False`); the order depends
    only on (seed, epoch), never on the process or global random state, so every process draws the
    same batches and Accelerate hands them out in turn. `len()` is exact and the same every epoch.

    labels: (N,) cluster of each dataset row (e.g. `cluster_labels`), integers >= 0.
    batch_size: rows per batch (per process); a multiple of `clusters_per_batch`.
    clusters_per_batch: clusters each cluster batch is drawn from; 1 makes single-cluster batches.
    seed: with the epoch (`set_epoch`), all the randomness of the order.
    drop_last: drop the last, incomplete batch.
    """

    def __init__(self, labels: Any, batch_size: int, clusters_per_batch: int, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long).cpu().flatten()  # (N,)
        _check(self.labels, batch_size, clusters_per_batch)
        self.batch_size, self.clusters_per_batch = batch_size, clusters_per_batch
        self.seed, self.drop_last = seed, drop_last
        self.chunk_size = batch_size // clusters_per_batch
        self.sampler = _Epoch()
        chunks = int((torch.bincount(self.labels) // self.chunk_size).sum())
        self.num_cluster_batches = chunks // clusters_per_batch
        tail_rows = len(self.labels) - self.num_cluster_batches * batch_size
        self.num_tail_batches = tail_rows // batch_size if drop_last else -(-tail_rows // batch_size)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order `__iter__` yields (training calls it before each epoch)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_cluster_batches + self.num_tail_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.epoch}".encode()))
        full, partial = self._batches(generator)
        yield from full[torch.randperm(len(full), generator=generator)].tolist()
        if len(partial) and not self.drop_last:
            yield partial.tolist()

    def _batches(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(full batches (B, batch_size), the last incomplete batch's rows) of one epoch."""
        rank = torch.randperm(int(self.labels.max()) + 1, generator=generator)  # shuffled cluster order
        rows = _group(torch.randperm(len(self.labels), generator=generator), rank[self.labels])  # (N,)
        cluster = rank[self.labels[rows]]  # (N,) the rank of each row's cluster, ascending
        counts = torch.bincount(cluster, minlength=len(rank))
        position = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[cluster]  # index inside the cluster
        in_chunk = position < (counts // self.chunk_size * self.chunk_size)[cluster]
        chunks = rows[in_chunk].view(-1, self.chunk_size)  # whole chunks, cluster after cluster
        chunks = chunks[torch.randperm(len(chunks), generator=generator)]
        used = self.num_cluster_batches * self.clusters_per_batch
        cluster_batches = chunks[:used].reshape(-1, self.batch_size)
        tail = torch.cat([chunks[used:].flatten(), rows[~in_chunk]])
        tail = _group(tail, rank[self.labels])
        whole = len(tail) // self.batch_size * self.batch_size
        return torch.cat([cluster_batches, tail[:whole].view(-1, self.batch_size)]), tail[whole:]


def _group(rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """`rows` ordered by `key[row]` (key: one value per dataset row), keeping their order within a key."""
    return rows[torch.sort(key[rows], stable=True).indices]


def _check(labels: torch.Tensor, batch_size: int, clusters_per_batch: int) -> None:
    if len(labels) == 0 or int(labels.min()) < 0:
        raise ConfigError("cluster labels must be a non-empty list of integers >= 0")
    if not 1 <= clusters_per_batch <= batch_size or batch_size % clusters_per_batch:
        raise ConfigError(f"batch size {batch_size} must be a multiple of clusters_per_batch "
                          f"({clusters_per_batch}), and clusters_per_batch at least 1")


# --- from a dataset ---------------------------------------------------------------------------------
def cluster_labels(ds: Any, image_column: str, bundle: Embedder, accelerator: Accelerator, num_clusters: int,
                   seed: int = 0, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """(N,) k-means cluster of each row of `ds`, from the image embeddings of `bundle` (a loaded
    model, `mmcl.towers.inference.load_encoder`, on `accelerator`'s device).

    Every process embeds its share of the rows and all get all embeddings; process 0 runs k-means
    on its device and broadcasts the labels, so every process builds the same batches (GPU arithmetic may differ between runs and devices).
    Unreadable images (zero embeddings) are spread over the clusters by row number rather than
    piled into one.
    """
    from accelerate.utils import broadcast

    embeds, valid = embed_images(bundle, ds, image_column, accelerator, batch_size, num_workers, progress=True)
    several = accelerator.num_processes > 1
    if several and not accelerator.is_main_process:
        labels = torch.zeros(len(embeds), dtype=torch.long)  # filled in by the broadcast
    else:
        labels = kmeans(embeds.to(accelerator.device), num_clusters, seed).cpu()
        rows = (~valid).nonzero().flatten()
        labels[rows] = rows % num_clusters
    if several:
        labels = broadcast(labels.to(accelerator.device), from_process=0).cpu()
    return labels
