"""SLIP's image–image term: NT-Xent against a loop reference in float64, and the head in the model."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import NTXentLoss
from tests.losses.cache_worker import global_batch, tiny_model


def naive_nt_xent(views, temperature, image_ids=None):
    """For each view a: -log( exp(s(a, partner)) / sum over every other view c of exp(s(a, c)) ),
    leaving out the views of other rows with a's image bytes; the mean over views."""
    n = views.shape[0]
    total = 0.0
    for a in range(n):
        partner = a ^ 1
        others = [c for c in range(n) if c != a and (c == partner or image_ids is None
                                                     or image_ids[c // 2] != image_ids[a // 2])]
        scores = {c: (views[a] * views[c]).sum() / temperature for c in others}
        total = total - (scores[partner] - torch.log(sum(torch.exp(v) for v in scores.values())))
    return total / n


@pytest.mark.parametrize("twins", [False, True])
def test_value_and_gradients_match_the_naive_reference(twins):
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=-1)
    got_views, want_views = base.clone().requires_grad_(), base.clone().requires_grad_()
    ids = torch.tensor([0, 1, 0, 3, 4]) if twins else None  # images 0 and 2: the same bytes
    got = NTXentLoss(0.1)(got_views, ids)
    want = naive_nt_xent(want_views, 0.1, ids)
    assert abs(got.item() - want.item()) < 1e-5
    got.backward()
    want.backward()
    assert torch.allclose(got_views.grad, want_views.grad, atol=1e-5)
    if twins:
        assert abs(got.item() - naive_nt_xent(base, 0.1).item()) > 1e-3


def test_identical_views_far_from_the_rest_give_a_low_loss():
    eye = torch.eye(6).repeat_interleave(2, dim=0)  # rows 2i, 2i+1: the same unit vector
    assert NTXentLoss(0.1)(eye).item() < 1e-3
    assert NTXentLoss(0.1)(eye.roll(1, 0)).item() > math.log(2)


def test_the_model_embeds_views_with_its_head_and_exports_without_it(tmp_path):
    from mmcl.towers.model import DualEncoder

    model = tiny_model(0.0, None)
    batch = global_batch(3)
    views = torch.cat([batch["pixel_values"], batch["pixel_values"].flip(-1)])
    with pytest.raises(ValueError, match="image–image head"):
        model(pixel_values=batch["pixel_values"], view_pixel_values=views)
    model.add_image_ssl_head(5)
    out = model(pixel_values=batch["pixel_values"], view_pixel_values=views)
    assert out.view_embeds.shape == (6, 5) and torch.allclose(out.view_embeds.norm(dim=-1), torch.ones(6))
    model.save_pretrained(tmp_path)
    again = DualEncoder.from_pretrained(tmp_path)
    assert torch.equal(again(view_pixel_values=views, pixel_values=batch["pixel_values"]).view_embeds,
                       out.view_embeds)
