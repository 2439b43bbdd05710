"""Extra candidates (a queue of earlier embeddings, each row's hard-negative captions) against
references written with loops in float64: value and gradients, twins never negatives."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import ClipLoss, Negatives, SigLipLoss
from mmcl.towers.model import DualEncoderOutput

N, Q, K, D = 5, 4, 2, 6


def unit(g, *shape):
    return F.normalize(torch.randn(*shape, D, generator=g, dtype=torch.float64), dim=-1)


def inputs(seed=0):
    """Leaves for the batch, the queue and the hard negatives; ids with twins of every kind."""
    g = torch.Generator().manual_seed(seed)
    x = {"images": unit(g, N), "texts": unit(g, N), "q_images": unit(g, Q), "q_texts": unit(g, Q),
         "row_texts": unit(g, N, K)}
    for v in x.values():
        v.requires_grad_()
    x["scale"] = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    x["bias"] = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ids = {"image_ids": torch.tensor([0, 1, 2, 0, 4]), "text_ids": torch.tensor([10, 11, 12, 13, 11]),
           # queued pair 0 shows row 1's image, queued pair 2 carries row 2's caption
           "q_image_ids": torch.tensor([1, 50, 51, 52]), "q_text_ids": torch.tensor([60, 61, 12, 63]),
           # row 3's first hard negative is its own caption (a padded slot); row 0's second is row 1's
           "row_text_ids": torch.tensor([[70, 11], [71, 72], [73, 74], [13, 75], [76, 77]])}
    return x, ids


def kept(i, ids, queue_index=None, row_slot=None):
    """Whether a candidate is a true negative of pair i (not its image, not its caption)."""
    if queue_index is not None:
        return ids["q_image_ids"][queue_index] != ids["image_ids"][i] and ids["q_text_ids"][queue_index] != ids["text_ids"][i]
    return ids["row_text_ids"][i][row_slot] != ids["text_ids"][i]


def batch_kept(i, j, ids):
    return j == i or (ids["image_ids"][j] != ids["image_ids"][i] and ids["text_ids"][j] != ids["text_ids"][i])


def naive_clip(x, ids):
    s = x["scale"].exp()
    total = 0.0
    for i in range(N):
        i2t = [s * x["images"][i] @ x["texts"][j] for j in range(N) if batch_kept(i, j, ids)]
        i2t += [s * x["images"][i] @ x["q_texts"][m] for m in range(Q) if kept(i, ids, queue_index=m)]
        i2t += [s * x["images"][i] @ x["row_texts"][i][r] for r in range(K) if kept(i, ids, row_slot=r)]
        t2i = [s * x["texts"][i] @ x["images"][j] for j in range(N) if batch_kept(i, j, ids)]
        t2i += [s * x["texts"][i] @ x["q_images"][m] for m in range(Q) if kept(i, ids, queue_index=m)]
        positive = s * x["images"][i] @ x["texts"][i]
        for scores in (i2t, t2i):
            total = total - (positive - torch.log(sum(torch.exp(v) for v in scores)))
    return total / (2 * N)


def naive_siglip(x, ids):
    s, b = x["scale"].exp(), x["bias"]

    def term(logit, sign):
        return -torch.log(1.0 / (1.0 + torch.exp(-sign * logit)))

    total = 0.0
    for i in range(N):
        for j in range(N):
            if batch_kept(i, j, ids):
                total = total + term(s * x["images"][i] @ x["texts"][j] + b, 1.0 if i == j else -1.0)
        for m in range(Q):
            if kept(i, ids, queue_index=m):
                total = total + term(s * x["images"][i] @ x["q_texts"][m] + b, -1.0)
                total = total + term(s * x["texts"][i] @ x["q_images"][m] + b, -1.0)
        for r in range(K):
            if kept(i, ids, row_slot=r):
                total = total + term(s * x["images"][i] @ x["row_texts"][i][r] + b, -1.0)
    return total / N


def mmcl_loss(name, x, ids):
    out = DualEncoderOutput(x["images"], x["texts"], x["scale"], x["bias"] if name == "siglip" else None)
    negatives = Negatives(texts=x["q_texts"], images=x["q_images"], image_ids=ids["q_image_ids"],
                          text_ids=ids["q_text_ids"], row_texts=x["row_texts"], row_text_ids=ids["row_text_ids"])
    loss = ClipLoss() if name == "clip" else SigLipLoss()
    return loss(out, image_ids=ids["image_ids"], text_ids=ids["text_ids"], negatives=negatives)


@pytest.mark.parametrize("name, naive", [("clip", naive_clip), ("siglip", naive_siglip)])
def test_value_and_gradients_match_the_naive_reference(name, naive):
    got_x, ids = inputs()
    want_x, _ = inputs()
    got, want = mmcl_loss(name, got_x, ids), naive(want_x, ids)
    assert abs(got.item() - want.item()) < 1e-5  # the losses compute in float32
    got.backward()
    want.backward()
    for key in got_x:
        if name == "clip" and key == "bias":
            continue
        assert torch.allclose(got_x[key].grad, want_x[key].grad, atol=1e-5), key
    # the extra candidates and their twins matter: without them the value differs
    plain, _ = inputs()
    ids_no_twins = {**ids, "q_image_ids": ids["q_image_ids"] + 1000, "q_text_ids": ids["q_text_ids"] + 1000,
                    "row_text_ids": ids["row_text_ids"] + 1000}
    assert abs(mmcl_loss(name, plain, ids_no_twins).item() - got.item()) > 1e-3


def test_an_empty_queue_changes_nothing():
    x, ids = inputs()
    out = DualEncoderOutput(x["images"], x["texts"], x["scale"])
    empty = Negatives(texts=x["q_texts"][:0], images=x["q_images"][:0], image_ids=ids["q_image_ids"][:0],
                      text_ids=ids["q_text_ids"][:0])
    assert torch.equal(ClipLoss()(out, ids["image_ids"], ids["text_ids"], empty),
                       ClipLoss()(out, ids["image_ids"], ids["text_ids"]))
