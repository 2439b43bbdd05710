"""SigLIP's sigmoid loss against a reference written with loops in float64, value and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import SigLipLoss
from mmcl.towers.model import DualEncoderOutput


def naive_siglip(images, texts, logit_scale, logit_bias, image_ids=None, text_ids=None):
    """Sum over every (image i, text j) pair of -log sigmoid(+-(t * <x_i, y_j> + b)), + for j == i,
    skipping j != i that shows i's image or carries i's caption; divided by the batch size."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            twin = j != i and image_ids is not None and (image_ids[j] == image_ids[i] or text_ids[j] == text_ids[i])
            if twin:
                continue
            logit = logit_scale.exp() * (images[i] * texts[j]).sum() + logit_bias
            sign = 1.0 if i == j else -1.0
            total = total - torch.log(1.0 / (1.0 + torch.exp(-sign * logit)))
    return total / n


def leaves(seed, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    return images, texts, scale, bias


@pytest.mark.parametrize("with_twins", [False, True])
def test_value_and_gradients_match_the_naive_reference(with_twins):
    ids = {}
    if with_twins:  # rows 0/3: the same image; rows 1/4: the identical caption
        ids = {"image_ids": torch.tensor([0, 1, 2, 0, 4, 5]), "text_ids": torch.tensor([10, 11, 12, 13, 11, 15])}
    got_inputs, want_inputs = leaves(0), leaves(0)
    got = SigLipLoss()(DualEncoderOutput(*got_inputs[:2], got_inputs[2], got_inputs[3]), **ids)
    want = naive_siglip(*want_inputs, ids.get("image_ids"), ids.get("text_ids"))
    assert abs(got.item() - want.item()) < 1e-5
    got.backward()
    want.backward()
    for mine, reference in zip(got_inputs, want_inputs):
        assert torch.allclose(mine.grad, reference.grad, atol=1e-5), (mine.grad, reference.grad)
    if with_twins:  # the twins' pairs changed the value: the mask is not a no-op
        assert abs(got.item() - naive_siglip(*leaves(0)).item()) > 1e-3


def test_aligned_pairs_give_a_low_loss_and_a_bias_is_required():
    eye = torch.eye(4)
    low = SigLipLoss()(DualEncoderOutput(eye, eye, torch.tensor(math.log(100.0)), torch.tensor(-10.0)))
    high = SigLipLoss()(DualEncoderOutput(eye, eye.roll(1, 0), torch.tensor(math.log(100.0)), torch.tensor(-10.0)))
    assert low.item() < 0.01 < high.item()
    with pytest.raises(ValueError, match="logit bias"):
        SigLipLoss()(DualEncoderOutput(eye, eye, torch.tensor(2.0)))
