"""Symmetric InfoNCE on one logits matrix, with a hand-written backward.

For the whole batch on one process the two directions of CLIP's loss are the rows and the columns
of one matrix L = scale * A @ B.T, so it is computed once (open_clip and transformers compute it
twice, then two softmaxes and their backwards over full B x B copies). Forward: the row and column
log-sum-exps, in row blocks. Backward: each row block of L again, its gradient
(softmax_rows + softmax_cols) / 2B written once, and both embeddings' gradients from it. Nothing of
size B x B is kept: memory is a few blocks, and the matmuls are 1 forward + 3 backward instead of
2 + 4. `tests/losses/test_symmetric.py` checks loss and gradients against `F.cross_entropy` on
both matrices.
"""

from __future__ import annotations

import math

import torch

BLOCK_ELEMENTS = 1 << 20  # rows per block * columns: 4 MB of float32, near the L2 cache (measured best at B=8192)
# A row's (column's) log-sum-exp more than this below the shared shift is recomputed with its own
# maximum. Otherwise its largest term is at least e^-(30 + ln B), and the terms that fell under
# float32's normal range (e^-87) add less than B^2 e^-57 of the sum: below 2e-13 up to B = 10^6.
FAR_BELOW = 30.0


class SymmetricInfoNCE(torch.autograd.Function):
    """loss = (CE(L, diag) over rows + CE(L.T, diag) over rows) / 2 with L = scale * a @ b.T.
    a, b: (B, D) float32; scale: one-element float32 tensor (exp of the logit scale).
    Each block is written into buffers allocated once (fresh temporaries per block cost page
    faults), and everything runs in float32 even inside an autocast region."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            return SymmetricInfoNCE._forward(ctx, a, b, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        with torch.autocast(grad.device.type, enabled=False):
            return SymmetricInfoNCE._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        scaled = a * scale
        # One shift for the whole matrix, a bound no logit exceeds, so each block takes one
        # exp and feeds both the row and the column sums.
        shift = scaled.norm(dim=1).max() * b.norm(dim=1).max()
        row_sum = a.new_empty(n)
        col_sum = a.new_zeros(n)
        block, _ = _buffers(a, n)
        for start, stop in _spans(n):
            exp = torch.mm(scaled[start:stop], b.T, out=block[: stop - start]).sub_(shift).exp_()
            torch.sum(exp, dim=1, out=row_sum[start:stop])
            col_sum.add_(exp.sum(dim=0))
        row_lse = row_sum.log_().add_(shift)
        col_lse = col_sum.log_().add_(shift)
        # A row or column whose largest logit lies far below the bound summed terms that may have
        # lost precision (or all underflowed): those few are summed again with their own maximum.
        low = row_lse < shift - FAR_BELOW
        if low.any():
            row_lse[low] = torch.logsumexp(scaled[low] @ b.T, dim=1)
        low = col_lse < shift - FAR_BELOW
        if low.any():
            col_lse[low] = torch.logsumexp(scaled @ b[low].T, dim=0)
        diag = (scaled * b).sum(dim=1)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        return (row_lse.mean() + col_lse.mean()) / 2 - diag.mean()

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        n = a.shape[0]
        scaled = a * scale
        # dloss/dL = (softmax over rows + softmax over columns) / 2n - I / n; the 1/2n is folded
        # into the exponents
        half = math.log(2 * n)
        row_shift, col_shift = (row_lse + half)[:, None], col_lse + half
        grad_a = torch.empty_like(a)
        grad_b_t = b.new_zeros(b.shape[1], n)  # transposed: the block's product needs no transposed operand
        block, work = _buffers(a, n)
        for start, stop in _spans(n):
            logits = torch.mm(scaled[start:stop], b.T, out=block[: stop - start])
            probs = torch.sub(logits, col_shift, out=work[: stop - start]).exp_()
            probs.add_(logits.sub_(row_shift[start:stop]).exp_())
            torch.mm(probs, b, out=grad_a[start:stop])
            grad_b_t.addmm_(scaled[start:stop].T, probs)
        grad_a.sub_(b, alpha=1 / n)  # the diagonal targets: -mean(diag L)
        grad_b = grad_b_t.T.sub(scaled, alpha=1 / n)
        # L = scale * a @ b.T, so dloss/dscale = sum(dloss/dL * a @ b.T) = sum(a * (dloss/dL @ b))
        grad_scale = (a * grad_a).sum()
        grad_a.mul_(scale)
        g = grad.to(a.dtype)
        return grad_a * g, grad_b * g, (grad_scale * g).reshape(scale.shape)


def _spans(n: int) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_ELEMENTS // n)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _buffers(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = min(n, max(1, BLOCK_ELEMENTS // n))
    return a.new_empty(rows, n), a.new_empty(rows, n)


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss for a batch whose pairs are the rows of `a` and `b`, one process (see the module)."""
    return SymmetricInfoNCE.apply(a, b, scale)
