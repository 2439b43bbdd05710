"""Metric math for CLIP-style evaluation: pure functions on torch tensors.

No I/O and no models here. Scores are computed in float32 on the device of the inputs.

Tie rule (used everywhere): the rank of a target among N candidates is
``1 + #(candidates scoring strictly higher) + #(candidates scoring equal with a lower index)``,
i.e. its 1-based position in a *stable* descending sort of the scores. Ties therefore go to the
candidate with the lower index, deterministically.

The same functions are published as Hugging Face ``evaluate`` modules under
``mmcl/evaluation/hf_evaluate/`` (``mmcl.evaluation.hf_evaluate.load_metric`` loads them by path,
offline); mmcl's own evaluation calls the functions here directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

__all__ = [
    "rank_of_target",
    "retrieval_metrics",
    "zero_shot_metrics",
    "per_class_accuracy",
    "class_embeddings",
]



def rank_of_target(scores: Tensor, target: Tensor) -> Tensor:
    """1-based rank of each query's target among its candidates, with the stable tie rule.

    Args:
        scores: (Q, N) scores of N candidates for each of Q queries; higher is better. Must be finite.
        target: (Q,) integer index in ``[0, N)`` of each query's correct candidate.

    Returns:
        (Q,) int64 ranks in ``[1, N]``: ``1 + #(score > target score)
        + #(score == target score and index < target)``.
    """
    if scores.ndim != 2 or target.ndim != 1 or target.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores (Q, N) and target (Q,), got {tuple(scores.shape)} and {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    if not torch.isfinite(scores).all():  # NaN compares False everywhere and would score as rank 1
        raise ValueError("scores contain NaN or infinite values")
    n = scores.shape[1]
    target = target.to(device=scores.device, dtype=torch.long)
    if target.numel() and (target.min() < 0 or target.max() >= n):
        raise ValueError(f"target indices must lie in [0, {n}), got range [{target.min()}, {target.max()}]")
    target_score = scores.gather(1, target[:, None])  # (Q, 1)
    higher = (scores > target_score).sum(1)  # (Q,)
    lower_index = torch.arange(n, device=scores.device)[None, :] < target[:, None]  # (Q, N)
    tied_before = ((scores == target_score) & lower_index).sum(1)  # (Q,)
    return higher + tied_before + 1


def _median(values: Tensor) -> float:
    """Statistical median of a 1-D tensor (mean of the two middle values for an even count)."""
    v = values.double().sort().values
    n = v.numel()
    return float((v[(n - 1) // 2] + v[n // 2]) / 2)


def _rank_summary(prefix: str, ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k (fraction of queries with rank <= k), median and mean rank of (Q,) 1-based ranks."""
    out = {f"{prefix}_R@{k}": float((ranks <= k).double().mean()) for k in ks}
    out[f"{prefix}_median_rank"] = _median(ranks)
    out[f"{prefix}_mean_rank"] = float(ranks.double().mean())
    return out


def _check_ks(ks: Sequence[int]) -> None:
    if len(ks) == 0 or any(isinstance(k, bool) or not isinstance(k, Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")


def _check_retrieval_inputs(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(
            f"image_embeds and text_embeds must be 2-D (N, D), got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"embedding dims differ: images D={image_embeds.shape[1]}, texts D={text_embeds.shape[1]}")
    if image_embeds.shape[0] == 0 or text_embeds.shape[0] == 0:
        raise ValueError(f"need at least one image and one text, got {image_embeds.shape[0]} and {text_embeds.shape[0]}")
    if text_to_image.shape != (text_embeds.shape[0],):
        raise ValueError(f"text_to_image must have shape ({text_embeds.shape[0]},), got {tuple(text_to_image.shape)}")
    if text_to_image.is_floating_point() or text_to_image.is_complex() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    n_img = image_embeds.shape[0]
    if text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(
            f"text_to_image values must lie in [0, {n_img}), got range [{text_to_image.min()}, {text_to_image.max()}]"
        )
    captionless = int((torch.bincount(text_to_image.long(), minlength=n_img) == 0).sum())
    if captionless:
        raise ValueError(f"{captionless} of {n_img} images have no caption in text_to_image")


def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image<->text retrieval Recall@k and rank statistics, with several captions per image.

    Similarity is the float32 dot product (embeddings are assumed L2-normalised). Ties follow the
    stable rule of :func:`rank_of_target` (the lower candidate index wins).

    - text -> image: each caption queries all images; its target is its own image.
    - image -> text: each image queries all captions; its rank is the best (smallest) rank among
      its own captions, so it is a hit at k if ANY of its captions is in its top k
      (CLIP_benchmark's definition).

    Memory is O(chunk_size * max(N_img, N_txt)): queries are processed ``chunk_size`` at a time,
    and only the count of candidates above each target is kept; no full similarity matrix or sort.
    Each direction is one matmul and two comparison passes over its scores.

    Args:
        image_embeds: (N_img, D) image embeddings.
        text_embeds: (N_txt, D) text embeddings.
        text_to_image: (N_txt,) integer; ``text_to_image[t]`` is the index of caption t's image.
            Every image must have at least one caption.
        ks: the k of each Recall@k.
        chunk_size: number of queries scored at once.

    Returns:
        ``image_to_text_R@{k}`` and ``text_to_image_R@{k}`` for each k (fractions in [0, 1]),
        ``{image_to_text,text_to_image}_{median,mean}_rank`` (1-based ranks; the median of an even
        count is the mean of the two middle ranks).
    """
    _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_retrieval_inputs(image_embeds, text_embeds, text_to_image)
    images, texts = image_embeds.float(), text_embeds.float()
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):  # NaN would rank first
        raise ValueError("image_embeds or text_embeds contain NaN or infinite values")
    t2i = text_to_image.to(device=images.device, dtype=torch.long)
    n_img, n_txt = images.shape[0], texts.shape[0]

    # text -> image: a chunk of captions against all images; the target is the caption's image.
    t2i_ranks = torch.empty(n_txt, dtype=torch.long, device=images.device)
    for s in range(0, n_txt, chunk_size):
        scores = texts[s : s + chunk_size] @ images.T  # (c, N_img)
        target = t2i[s : s + chunk_size]
        t2i_ranks[s : s + chunk_size] = _stable_rank(scores, scores.gather(1, target[:, None]), target)

    # image -> text: a chunk of images against all captions. An image's best rank among its own
    # captions is the rank of its best-scoring own caption (the lowest index among equals).
    caption_order = torch.sort(t2i, stable=True).indices  # (N_txt,) captions grouped by image
    bounds = torch.cat([t2i.new_zeros(1), torch.bincount(t2i, minlength=n_img).cumsum(0)]).tolist()
    best = torch.empty(n_img, dtype=torch.long, device=images.device)
    for s in range(0, n_img, chunk_size):
        e = min(s + chunk_size, n_img)
        scores = images[s:e] @ texts.T  # (c, N_txt)
        captions = caption_order[bounds[s] : bounds[e]]  # this chunk's own captions, grouped by image
        owners = t2i[captions] - s
        own = scores[owners, captions]
        top = torch.full((e - s,), float("-inf"), device=images.device).scatter_reduce_(0, owners, own, "amax")
        first = torch.where(own == top[owners], captions, n_txt)
        first = torch.full((e - s,), n_txt, device=images.device).scatter_reduce_(0, owners, first, "amin")
        best[s:e] = _stable_rank(scores, top[:, None], first)
    out = _rank_summary("image_to_text", best, ks)
    out.update(_rank_summary("text_to_image", t2i_ranks, ks))
    return out


def _stable_rank(scores: Tensor, target_score: Tensor, target: Tensor) -> Tensor:
    """`rank_of_target` given the target scores (Q, 1), without its checks: two passes over the
    scores, and the index tie-break only on the rare rows where another candidate ties exactly."""
    ranks = (scores > target_score).sum(1).add_(1)
    tied = ((scores == target_score).sum(1) > 1).nonzero().squeeze(1)
    if tied.numel():
        before = torch.arange(scores.shape[1], device=scores.device)[None, :] < target[tied, None]
        ranks[tied] += ((scores[tied] == target_score[tied]) & before).sum(1)
    return ranks


def _check_classification_inputs(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"need at least one sample and one class, got logits of shape {tuple(logits.shape)}")


def _per_class_recall(correct: Tensor, labels: Tensor, n_classes: int) -> dict[int, float]:
    """{class: fraction of its samples with correct=True} over classes present in (N,) labels."""
    labels = labels.to(device=correct.device, dtype=torch.long)
    support = torch.bincount(labels, minlength=n_classes)  # (C,)
    hits = torch.bincount(labels, weights=correct.double(), minlength=n_classes)  # (C,)
    return {c: float(hits[c] / support[c]) for c in support.nonzero().flatten().tolist()}


def per_class_accuracy(logits: Tensor, labels: Tensor) -> dict[int, float]:
    """Top-1 accuracy of each class, i.e. its recall: the fraction of its samples predicted as it.

    Args:
        logits: (N, C) class scores per sample; top-1 ties go to the lower class index.
        labels: (N,) integer true class in ``[0, C)``.

    Returns:
        ``{class_index: recall}`` for every class that occurs in ``labels`` (absent classes are omitted).
    """
    _check_classification_inputs(logits, labels)
    return _per_class_recall(rank_of_target(logits.float(), labels) == 1, labels, logits.shape[1])


def zero_shot_metrics(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot classification accuracy from image-vs-class-embedding logits.

    Args:
        logits: (N, C) scores of C classes for N images (e.g. ``image_embeds @ class_embeds.T``).
        labels: (N,) integer true class in ``[0, C)``.
        ks: the k of each top-k accuracy; a k larger than C is skipped (it would trivially be 1).

    Returns:
        ``top{k}`` for each k <= C: fraction of samples whose label ranks in the top k, ties going
        to the lower class index; ``mean_per_class_recall``: the mean over the classes present in
        ``labels`` of their top-1 recall (see :func:`per_class_accuracy` for the per-class values).
    """
    _check_ks(ks)
    _check_classification_inputs(logits, labels)
    ranks = rank_of_target(logits.float(), labels)  # (N,)
    out = {f"top{k}": float((ranks <= k).double().mean()) for k in ks if k <= logits.shape[1]}
    recalls = _per_class_recall(ranks == 1, labels, logits.shape[1])
    out["mean_per_class_recall"] = sum(recalls.values()) / len(recalls)
    return out


def class_embeddings(text_embeds: Tensor) -> Tensor:
    """CLIP prompt ensembling: one embedding per class from its prompt-template embeddings.

    Each template embedding is L2-normalised (a no-op for normalised inputs), averaged over the
    templates and re-normalised, as in CLIP's zero-shot notebook.

    Args:
        text_embeds: (C, T, D) embeddings of C classes under T prompt templates.

    Returns:
        (C, D) float32 unit-norm class embeddings.
    """
    if text_embeds.ndim != 3 or 0 in text_embeds.shape:
        raise ValueError(f"expected non-empty text_embeds of shape (C, T, D), got {tuple(text_embeds.shape)}")
    per_template = torch.nn.functional.normalize(text_embeds.float(), dim=-1)  # (C, T, D)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)  # (C, D)
