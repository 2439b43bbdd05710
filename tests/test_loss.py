import math

import torch
import torch.nn.functional as F

from mmcl.loss import ClipLoss


def naive_clip_loss(images, texts, logit_scale):
    """CLIP's loss written out with loops: -log softmax of each positive, both directions."""
    n = images.shape[0]
    scale = math.exp(logit_scale)
    sims = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(n)) / n
    cols = [[sims[i][j] for i in range(n)] for j in range(n)]
    t2i = sum(-(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j]))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_matches_naive_reference():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    got = ClipLoss()(images, texts, scale)
    assert abs(got.item() - naive_clip_loss(images, texts, scale.item())) < 1e-5


def test_perfect_alignment_gives_low_loss_and_is_symmetric():
    eye = torch.eye(6)
    scale = torch.tensor(math.log(100.0))
    assert ClipLoss()(eye, eye, scale).item() < 1e-3
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    assert torch.allclose(ClipLoss()(a, b, scale), ClipLoss()(b, a, scale))


def test_gradient_reaches_embeddings_and_temperature():
    a = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    ClipLoss()(a, b, scale).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 and scale.grad != 0
