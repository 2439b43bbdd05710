"""The one-matrix symmetric InfoNCE against the two-matrix reference (two cross-entropies)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import symmetric
from mmcl.losses.clip import ClipLoss
from mmcl.towers.model import DualEncoderOutput


def reference(a, b, logit_scale):
    scale = logit_scale.exp()
    targets = torch.arange(len(a))
    return (F.cross_entropy(scale * a @ b.T, targets) + F.cross_entropy(scale * b @ a.T, targets)) / 2


def inputs(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return a, b, torch.tensor([2.659], dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("n, block", [(7, 1 << 22), (37, 64), (64, 64), (50, 1)])
def test_loss_and_gradients_equal_two_cross_entropies(monkeypatch, n, block):
    """float64, blocks of every shape (one row, ragged last block, one block): equal to 1e-12."""
    monkeypatch.setattr(symmetric, "BLOCK_ELEMENTS", block)
    a, b, s = inputs(n)
    ref = reference(a, b, s)
    ref_grads = torch.autograd.grad(ref * 1.7, (a, b, s))
    out = symmetric.symmetric_infonce(a, b, s.exp())
    grads = torch.autograd.grad(out * 1.7, (a, b, s))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_rows_and_columns_far_below_the_shared_shift(monkeypatch):
    """Scale 100, captions near their images (norms 0.98-1.02), but image 3 orthogonal to every
    caption and caption 7 to every image: such rows and columns take the exact path, the others
    the shared shift; all equal the reference to 1e-12."""
    monkeypatch.setattr(symmetric, "BLOCK_ELEMENTS", 40)
    a, _, _ = inputs(20, d=8, seed=2)
    a = a.detach().clone()
    a[:, 0] = 0
    a = F.normalize(a, dim=-1)
    b = F.normalize(a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4), dtype=a.dtype), dim=-1)
    a[3] = b[7] = torch.eye(8, dtype=a.dtype)[0]
    b[7] = -b[7]
    a = (a * torch.linspace(0.98, 1.02, 20, dtype=a.dtype)[:, None]).requires_grad_()
    b = b.requires_grad_()
    s = torch.tensor([math.log(100.0)], dtype=a.dtype, requires_grad=True)
    exact = []
    monkeypatch.setattr(torch, "logsumexp", lambda x, dim, f=torch.logsumexp: exact.append(x.shape) or f(x, dim))
    got = symmetric.symmetric_infonce(a, b, s.exp())
    (rows, _), (_, cols) = exact  # some rows and some columns went the exact way, not all
    assert 1 <= rows < 20 and 1 <= cols < 20
    ref = reference(a, b, s)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    for x, y in zip(torch.autograd.grad(got, (a, b, s)), torch.autograd.grad(ref, (a, b, s))):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)


def test_float32_inside_bf16_autocast(monkeypatch):
    """Inside an autocast region (the training loop's bf16) the loss still runs in float32, also on
    its exact path for rows far below the shift."""
    monkeypatch.setattr(symmetric, "FAR_BELOW", -1e9)  # every row and column takes the exact path too
    a, b, s = (t.detach().float().requires_grad_() for t in inputs(64, d=32, seed=5))
    want = symmetric.symmetric_infonce(a, b, s.exp())
    want_grads = torch.autograd.grad(want, (a, b, s))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = symmetric.symmetric_infonce(a, b, s.exp())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for x, y in zip(torch.autograd.grad(got, (a, b, s)), want_grads):
        assert torch.equal(x, y)


def test_gradcheck():
    a, b, s = inputs(9, d=4, seed=3)
    assert torch.autograd.gradcheck(lambda a, b, s: symmetric.symmetric_infonce(a, b, s.exp()), (a, b, s))


def test_clip_loss_uses_it_and_keeps_float32_values():
    """ClipLoss on one process (no twins, no extra negatives) against the reference, float32."""
    a, b, s = (t.detach().float().requires_grad_() for t in inputs(300, d=32, seed=1))
    want = reference(a, b, s)
    want_grads = torch.autograd.grad(want, (a, b, s))
    got = ClipLoss()(DualEncoderOutput(a, b, s))
    got_grads = torch.autograd.grad(got, (a, b, s))
    assert abs(got.item() - want.item()) < 1e-5
    for x, y in zip(got_grads, want_grads):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
