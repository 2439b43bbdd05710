"""Cluster batches: k-means finds clusters whose answer is known, the sampler covers each row at most
once per epoch with batches from few clusters, its length is exact and its order depends on
(seed, epoch) only, also through Accelerate's sharding."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from PIL import Image

from mmcl.config import ConfigError
from mmcl.data.clusters import ClusterBatchSampler, cluster_labels, kmeans
from mmcl.towers.inference import load_encoder
from tests.conftest import save_tiny_model


def blobs(seed: int = 0, per_blob: int = 60, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """4 tight, well-separated Gaussian blobs on the unit sphere, rows shuffled -> (x, true labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    truth = torch.arange(4).repeat_interleave(per_blob)
    x = F.normalize(centres[truth] + 0.05 * torch.randn(len(truth), dim, generator=g), dim=1)
    order = torch.randperm(len(truth), generator=g)
    return x[order], truth[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_separated_blobs_exactly_and_is_deterministic(seed):
    x, truth = blobs(seed)
    labels = kmeans(x, 4, seed=seed)
    assert labels.shape == truth.shape and labels.dtype == torch.long
    assert same_partition(labels, truth)
    assert torch.equal(kmeans(x, 4, seed=seed, block_size=7), labels)  # blocks change nothing
    torch.manual_seed(seed + 100)  # the global random state plays no part
    assert torch.equal(kmeans(x, 4, seed=seed), labels)


def test_kmeans_ends_at_a_fixed_point_of_lloyds_step():
    """Each point's cluster is the one whose re-normalised mean is nearest to it (cosine)."""
    x = F.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    labels = kmeans(x, 6, seed=0, iters=200)
    centroids = F.normalize(torch.stack([x[labels == c].mean(0) for c in range(6)]), dim=1)
    assert torch.equal((x @ centroids.T).argmax(dim=1), labels)


def test_kmeans_keeps_every_cluster_and_rejects_impossible_k():
    x = F.normalize(torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5), dim=1)
    assert same_partition(kmeans(x, 2), torch.tensor([0] * 5 + [1] * 5))
    labels = kmeans(x, 3)  # only two distinct points: an empty cluster is reseeded, labels stay valid
    assert labels.min() >= 0 and labels.max() <= 2
    with pytest.raises(ConfigError, match="num_clusters"):
        kmeans(x, 11)
    with pytest.raises(ConfigError, match="clusters_per_batch"):
        ClusterBatchSampler(torch.zeros(10, dtype=torch.long), 6, 4, seed=0)


# --- the sampler ------------------------------------------------------------------------------------
def uneven_labels(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Cluster labels with the given cluster sizes, in a shuffled row order."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


SIZES = [1, 2, 5, 9, 17, 33, 40, 3]  # small clusters (all tail) and large ones


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_epoch_uses_each_row_at_most_once_in_batches_of_few_clusters(drop_last):
    labels = uneven_labels(SIZES)
    sampler = ClusterBatchSampler(labels, batch_size=8, clusters_per_batch=2, seed=0, drop_last=drop_last)
    assert 0 < sampler.num_tail_batches <= len(SIZES) / 2 + 1  # the documented bound
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        rows = [r for batch in batches for r in batch]
        assert len(batches) == len(sampler) and len(rows) == len(set(rows))
        if drop_last:
            assert all(len(b) == 8 for b in batches) and len(labels) - len(rows) < 8
        else:
            assert sorted(rows) == list(range(len(labels))) and all(len(b) == 8 for b in batches[:-1])
        touched = [len(set(labels[b].tolist())) for b in batches]
        assert sum(t <= 2 for t in touched) >= sampler.num_cluster_batches  # only tail batches may mix more


def test_without_a_tail_every_batch_comes_from_at_most_clusters_per_batch_clusters():
    labels = uneven_labels([12, 24, 4, 8, 16])  # 16 chunks of 4: 4 batches of 4 chunks, nothing left
    sampler = ClusterBatchSampler(labels, batch_size=16, clusters_per_batch=4, seed=3)
    assert sampler.num_tail_batches == 0 and len(sampler) == 4
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert all(len(set(labels[b].tolist())) <= 4 for b in sampler)
    single = ClusterBatchSampler(labels, batch_size=4, clusters_per_batch=1, seed=3)
    assert all(len(set(labels[b].tolist())) == 1 for b in single) and len(list(single)) == 16


def test_len_is_exact_for_any_sizes():
    g = torch.Generator().manual_seed(5)
    for trial in range(30):
        sizes = torch.randint(1, 30, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        cpb = int(torch.randint(1, 4, (1,), generator=g))
        batch_size = cpb * int(torch.randint(1, 6, (1,), generator=g))
        for drop_last in (True, False):
            sampler = ClusterBatchSampler(uneven_labels(sizes, trial), batch_size, cpb, seed=trial, drop_last=drop_last)
            for epoch in range(2):
                sampler.set_epoch(epoch)
                assert len(list(sampler)) == len(sampler), (sizes, batch_size, cpb, drop_last)


def test_the_order_depends_on_seed_and_epoch_only():
    labels = uneven_labels(SIZES)

    def order(seed: int, epoch: int) -> list[list[int]]:
        sampler = ClusterBatchSampler(labels, 8, 2, seed=seed)
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 10 + epoch + 1)  # the global random state plays no part
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_forwards_the_epoch_and_shards_whole_batches(processes):
    labels = uneven_labels(SIZES)
    sampler = ClusterBatchSampler(labels, 8, 2, seed=0)
    loader = torch.utils.data.DataLoader(list(range(len(labels))), batch_sampler=sampler)
    for epoch in (3, 4):
        expected = ClusterBatchSampler(labels, 8, 2, seed=0)
        expected.set_epoch(epoch)
        expected = list(expected)
        for p in range(processes):  # each process prepares its loader and sets the epoch, as training does
            shard = prepare_data_loader(loader, num_processes=processes, process_index=p)
            shard.set_epoch(epoch)
            assert sampler.epoch == epoch
            assert [b.tolist() for b in shard] == expected[p::processes][: len(expected) // processes]


# --- from a dataset ---------------------------------------------------------------------------------
def test_cluster_labels_embeds_a_dataset_and_spreads_unreadable_rows(tmp_path):
    paths = []
    for i in range(8):  # two kinds of image: dark noise and bright noise
        pixels = np.random.default_rng(i).integers(0, 60, (16, 16, 3)) + (180 if i % 2 else 0)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    paths += [str(tmp_path / "missing.png")] * 2
    ds = datasets.Dataset.from_dict({"image": paths})
    model = save_tiny_model(tmp_path / "model", "dark bright noise")
    labels = cluster_labels(ds, "image", load_encoder(str(model)), Accelerator(cpu=True), num_clusters=2, seed=0,
                            batch_size=4)
    assert labels.shape == (10,) and set(labels.tolist()) <= {0, 1}
    assert labels[8:].tolist() == [0, 1]  # unreadable rows 8 and 9: spread by row number
    again = cluster_labels(ds, "image", load_encoder(str(model)), Accelerator(cpu=True), num_clusters=2, seed=0,
                           batch_size=4)
    assert torch.equal(again, labels)  # seeded: the same clusters twice
