"""Tests for mmcl.evaluation.metrics: naive references written here, oracle embeddings, hand-built cases.

Tie tests use embeddings with dyadic (k/4) entries, so every dot product is exact in float32 and
in float64: ties are true ties, and chunking cannot change a score by rounding.
"""

import os
import statistics
import subprocess
import sys

import pytest
import torch

from mmcl.evaluation.hf_evaluate import load_metric
from mmcl.evaluation.metrics import (
    class_embeddings,
    per_class_accuracy,
    rank_of_target,
    retrieval_metrics,
    zero_shot_metrics,
)

# ---------------------------------------------------------------- naive references


def naive_rank(scores: list[float], target: int) -> int:
    """1-based position of `target` in a stable descending sort (Python's sort is stable)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order.index(target) + 1


def naive_summary(prefix: str, ranks: list[int], ks) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}
    out[f"{prefix}_median_rank"] = float(statistics.median(ranks))
    out[f"{prefix}_mean_rank"] = float(statistics.mean(ranks))
    return out


def naive_retrieval(images, texts, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    sim = (images.double() @ texts.double().T).tolist()  # full (N_img, N_txt) matrix
    t2i = text_to_image.tolist()
    i2t_ranks = []
    for i, row in enumerate(sim):
        i2t_ranks.append(min(naive_rank(row, t) for t in range(len(t2i)) if t2i[t] == i))
    t2i_ranks = [naive_rank([sim[i][t] for i in range(len(sim))], t2i[t]) for t in range(len(t2i))]
    return {**naive_summary("image_to_text", i2t_ranks, ks), **naive_summary("text_to_image", t2i_ranks, ks)}


def naive_zero_shot(logits, labels, ks=(1, 5)) -> dict[str, float]:
    rows, ys = logits.double().tolist(), labels.tolist()
    ranks = [naive_rank(row, y) for row, y in zip(rows, ys)]
    out = {f"top{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks if k <= logits.shape[1]}
    recalls = []
    for c in sorted(set(ys)):
        mine = [r for r, y in zip(ranks, ys) if y == c]
        recalls.append(sum(r == 1 for r in mine) / len(mine))
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


# ---------------------------------------------------------------- data


def quantised(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(n, d) entries in {-1, -0.75, ..., 1}: exact dot products and many exact ties."""
    return torch.randint(-4, 5, (n, d), generator=gen).float() / 4


def multi_caption_data(seed: int, n_img: int = 17, d: int = 4):
    """Images with 1-4 captions each, captions shuffled; duplicated captions and images for ties."""
    gen = torch.Generator().manual_seed(seed)
    images = quantised(n_img, d, gen)
    images[3] = images[5]  # duplicated image embeddings: tied candidates for text->image
    counts = torch.randint(1, 5, (n_img,), generator=gen)
    text_to_image = torch.repeat_interleave(torch.arange(n_img), counts)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    texts = quantised(len(text_to_image), d, gen)
    texts[1] = texts[0]  # duplicated captions: tied candidates for image->text
    return images, texts, text_to_image


# ---------------------------------------------------------------- rank_of_target


def test_rank_of_target_stable_tie_rule():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0]] * 4)
    ranks = rank_of_target(scores, torch.tensor([0, 1, 2, 3]))
    # index 2 ties with index 0 (lower index wins) -> rank 2; index 3 has two 3.0s above it.
    assert ranks.tolist() == [1, 4, 2, 3]


def test_rank_of_target_errors():
    with pytest.raises(ValueError, match="Q, N"):
        rank_of_target(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        rank_of_target(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="lie in"):
        rank_of_target(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_with_ties_and_multiple_captions(seed):
    images, texts, text_to_image = multi_caption_data(seed)
    got = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5, 10), chunk_size=4)
    assert got == pytest.approx(naive_retrieval(images, texts, text_to_image, ks=(1, 2, 5, 10)), abs=1e-12)


def test_retrieval_matches_naive_on_normalised_random_embeddings():
    gen = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    text_to_image = torch.randperm(20, generator=gen).repeat(3)[:50]  # 2-3 captions per image
    texts = torch.nn.functional.normalize(images[text_to_image] + torch.randn(50, 8, generator=gen), dim=-1)
    assert retrieval_metrics(images, texts, text_to_image) == pytest.approx(naive_retrieval(images, texts, text_to_image))


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_chunked_equals_unchunked(seed):
    images, texts, text_to_image = multi_caption_data(seed)
    full = retrieval_metrics(images, texts, text_to_image, chunk_size=10_000)
    for chunk_size in (1, 3, len(texts)):
        assert retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size) == full


def test_retrieval_oracle_is_perfect():
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=-1)
    text_to_image = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 3, 3, 7])
    out = retrieval_metrics(images, images[text_to_image].clone(), text_to_image, chunk_size=5)
    assert out == {key: 1.0 for key in out}  # every R@k and every rank is 1


def test_retrieval_hand_built_recall_at_5():
    # 10 one-hot images. Text t (caption of image t) scores 1.0 on its image and 2.0 on 2 other
    # images when t is even (rank 3) or on 6 other images when t is odd (rank 7).
    n = 10
    images = torch.eye(n)
    texts = torch.zeros(n, n)
    for t in range(n):
        texts[t, t] = 1.0
        others = [i for i in range(n) if i != t][: 2 if t % 2 == 0 else 6]
        texts[t, others] = 2.0
    out = retrieval_metrics(images, texts, torch.arange(n))
    assert out["text_to_image_R@1"] == 0.0
    assert out["text_to_image_R@5"] == 0.5
    assert out["text_to_image_R@10"] == 1.0
    assert out["text_to_image_median_rank"] == 5.0 and out["text_to_image_mean_rank"] == 5.0


def test_retrieval_all_tied_scores_rank_by_index():
    # All scores 0: the rank of candidate j is j + 1 in both directions.
    n = 10
    out = retrieval_metrics(torch.eye(n), torch.zeros(n, n), torch.arange(n), ks=(1, 5))
    for direction in ("image_to_text", "text_to_image"):
        assert out[f"{direction}_R@1"] == 0.1 and out[f"{direction}_R@5"] == 0.5
        assert out[f"{direction}_mean_rank"] == 5.5 and out[f"{direction}_median_rank"] == 5.5


def test_retrieval_image_rank_is_best_caption_rank():
    # Image 0 scores texts [0.7, 0.5, 0.6, 0.65]; its captions 1 and 3 rank 4 and 2 -> rank 2.
    # Image 1 scores texts [0, 0, 1, 0]; its captions 0 and 2 rank 2 and 1 -> rank 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.7, 0.0], [0.5, 0.0], [0.6, 1.0], [0.65, 0.0]])
    for chunk_size in (1, 2, 4):
        out = retrieval_metrics(images, texts, torch.tensor([1, 0, 1, 0]), ks=(1, 2), chunk_size=chunk_size)
        assert out["image_to_text_R@1"] == 0.5 and out["image_to_text_R@2"] == 1.0
        assert out["image_to_text_mean_rank"] == 1.5 and out["image_to_text_median_rank"] == 1.5


def test_retrieval_validation_errors():
    images, texts, t2i = torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="2 of 5 images have no caption"):
        retrieval_metrics(torch.zeros(5, 4), texts, t2i)
    with pytest.raises(ValueError, match="dims differ"):
        retrieval_metrics(images, torch.zeros(4, 5), t2i)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(images[0], texts, t2i)
    with pytest.raises(ValueError, match="at least one"):
        retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        retrieval_metrics(images, texts, t2i[:3])
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(images, texts, t2i.float())
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(images, texts, t2i, chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(images, texts, t2i, ks=(0,))


# ---------------------------------------------------------------- zero-shot


def test_zero_shot_matches_naive_on_imbalanced_labels_with_ties():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 1 + [4] * 12)  # class 3 absent
    labels = labels[torch.randperm(len(labels), generator=gen)]
    logits = quantised(len(labels), 7, gen)  # many tied logits
    logits[labels == 0, 0] += 0.5  # make class 0 mostly right, so recalls differ per class
    got = zero_shot_metrics(logits, labels, ks=(1, 3, 5, 9))
    assert got == pytest.approx(naive_zero_shot(logits, labels, ks=(1, 3, 5, 9)), abs=1e-12)
    assert "top9" not in got  # k > C is skipped
    per_class = per_class_accuracy(logits, labels)
    assert sorted(per_class) == [0, 1, 2, 4]
    assert got["mean_per_class_recall"] == pytest.approx(sum(per_class.values()) / 4)
    assert got["mean_per_class_recall"] != pytest.approx(got["top1"])  # imbalance matters


def test_zero_shot_top1_tie_goes_to_lower_class_index():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = zero_shot_metrics(logits, torch.tensor([0, 1]), ks=(1, 2))
    assert out == {"top1": 0.5, "top2": 1.0, "mean_per_class_recall": 0.5}


def test_zero_shot_oracle_is_perfect_with_prompt_ensembling():
    gen = torch.Generator().manual_seed(0)
    n_classes, n_templates, d = 6, 3, 8
    prompts = torch.eye(d)[:n_classes, None, :] + 0.1 * torch.randn(n_classes, n_templates, d, generator=gen)
    class_embeds = class_embeddings(prompts)  # (C, D)
    labels = torch.randint(0, n_classes, (40,), generator=gen)
    logits = class_embeds[labels] @ class_embeds.T  # each image is exactly its class embedding
    out = zero_shot_metrics(logits, labels)
    assert out == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}


def test_zero_shot_validation_errors():
    with pytest.raises(ValueError, match="N, C"):
        zero_shot_metrics(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="N, C"):
        zero_shot_metrics(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        zero_shot_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


# ---------------------------------------------------------------- class embeddings


def test_class_embeddings_mean_then_renormalise():
    gen = torch.Generator().manual_seed(0)
    prompts = torch.nn.functional.normalize(torch.randn(5, 4, 8, generator=gen), dim=-1)
    out = class_embeddings(prompts)
    assert out.shape == (5, 8) and out.dtype == torch.float32
    expected = prompts.mean(1) / prompts.mean(1).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(class_embeddings(prompts[:, :1]), prompts[:, 0])
    with pytest.raises(ValueError, match="C, T, D"):
        class_embeddings(prompts[0])


# ---------------------------------------------------------------- evaluate modules


def test_metrics_module_does_not_import_evaluate():
    code = "import sys, mmcl.evaluation.metrics; assert 'evaluate' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def offline_hf(tmp_path_factory):
    """Offline Hugging Face env with a private HF_HOME (takes effect if evaluate is not yet imported)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            mp.setenv(var, "1")
        yield tmp_path_factory.mktemp("evaluate_cache")


def test_load_metric_unknown_name():
    with pytest.raises(ValueError, match="available: retrieval, zero_shot_accuracy"):
        load_metric("accuracy")


def test_evaluate_zero_shot_module_matches_pure_function(offline_hf):
    metric = load_metric("zero_shot_accuracy", cache_dir=str(offline_hf))
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(30, 8, generator=gen), torch.randint(0, 8, (30,), generator=gen)
    for start in range(0, 30, 7):  # streamed batches
        metric.add_batch(predictions=logits[start : start + 7], references=labels[start : start + 7])
    assert metric.compute(ks=[1, 5]) == zero_shot_metrics(logits, labels)
    assert metric.compute(predictions=logits.tolist(), references=labels.tolist(), ks=(1,)) == zero_shot_metrics(
        logits, labels, ks=(1,)
    )


def test_evaluate_retrieval_module_matches_pure_function(offline_hf):
    metric = load_metric("retrieval", cache_dir=str(offline_hf))
    images, texts, text_to_image = multi_caption_data(0)
    for start in range(0, len(texts), 10):
        metric.add_batch(text_embeds=texts[start : start + 10], text_to_image=text_to_image[start : start + 10])
    got = metric.compute(image_embeds=images, ks=(1, 5), chunk_size=3)
    assert got == retrieval_metrics(images, texts, text_to_image, ks=(1, 5))
    with pytest.raises(ValueError, match="image_embeds"):
        metric.compute(text_embeds=texts.tolist(), text_to_image=text_to_image.tolist())
