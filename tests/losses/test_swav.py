"""SwAV's term: Sinkhorn against a direct float64 iteration, the swapped-prediction terms against a
float64 loop (value and gradient, the codes without gradient), the prototypes frozen then learning
and kept unit norm, the queue's rows in the partition, and GradCache giving the full-batch step.
(2 processes = 1 process and resume: tests/losses/test_distributed.py and tests/test_train.py.)"""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mmcl.config import LossConfig
from mmcl.losses import SwAV, build_loss, sinkhorn
from mmcl.losses.objective import Objective
from tests.losses.cache_worker import global_batch, tiny_model


def naive_sinkhorn(scores, epsilon, iterations):
    """The Sinkhorn-Knopp iteration written out on Q = exp(S / epsilon)^T (K x B), float64: scale to
    total mass 1, then alternately make every prototype row hold 1/K and every sample column 1/B;
    the codes are B x the columns."""
    q = [[float(torch.exp(scores[b, k].double() / epsilon)) for b in range(scores.shape[0])]
         for k in range(scores.shape[1])]
    K, B = len(q), len(q[0])
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / K for v in row] for row in q]
        cols = [sum(q[k][b] for k in range(K)) for b in range(B)]
        q = [[q[k][b] / cols[b] / B for b in range(B)] for k in range(K)]
    return torch.tensor([[q[k][b] * B for k in range(K)] for b in range(B)], dtype=torch.float64)


def test_sinkhorn_matches_the_direct_iteration_and_partitions_equally():
    scores = F.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    got = sinkhorn(scores, 0.05, 3).double()
    assert torch.allclose(got, naive_sinkhorn(scores, 0.05, 3), atol=1e-5)
    assert torch.allclose(got.sum(dim=1), torch.ones(12, dtype=torch.float64), atol=1e-6)  # each row a distribution
    many = sinkhorn(scores, 0.05, 500).double()
    assert torch.allclose(many.sum(dim=0), torch.full((5,), 12 / 5, dtype=torch.float64), atol=1e-3)  # equal shares
    assert not torch.allclose(sinkhorn(scores, 0.05, 1).double(), got, atol=1e-3)  # the iterations count


def swav_module(freeze_steps=0, queue_size=0, weight=0.5):
    return SwAV(weight, 0.1, 0.05, 3, freeze_steps, queue_size, {"views": 4, "images": 8, "texts": 8})


def naive_terms(views, images, texts, view_protos, pair_protos, temperature=0.1, epsilon=0.05):
    """Both terms as loops over rows, float64: each row's predicted distribution softmax(z . c / t)
    against its partner's Sinkhorn code (computed without gradient)."""
    def term(rows, partners_codes, protos):
        total = 0.0
        for i in range(len(rows)):
            logp = torch.log_softmax(rows[i] @ protos.T / temperature, dim=-1)
            total = total - (partners_codes[i] * logp).sum()
        return total / len(rows)

    vc = naive_sinkhorn((views @ view_protos.T).detach(), epsilon, 3)
    ic = naive_sinkhorn((images @ pair_protos.T).detach(), epsilon, 3)
    tc = naive_sinkhorn((texts @ pair_protos.T).detach(), epsilon, 3)
    partner = [i + 1 if i % 2 == 0 else i - 1 for i in range(len(views))]
    return term(views, vc[partner], view_protos), (term(texts, ic, pair_protos) + term(images, tc, pair_protos)) / 2


def test_terms_and_gradients_match_the_float64_loop():
    model = tiny_model(0.0, None, 4)
    model.add_prototypes(6)
    g = torch.Generator().manual_seed(3)
    raw = [torch.randn(n, d, generator=g, dtype=torch.float64) for n, d in ((8, 4), (4, 8), (4, 8))]
    ours = [F.normalize(r.clone().float(), dim=-1).requires_grad_() for r in raw]
    swav = swav_module()
    swav.before_step(model)
    got = swav(model, *ours)
    (got["loss_swav_views"] + got["loss_swav_pairs"]).backward()
    theirs = [F.normalize(r, dim=-1).detach().requires_grad_() for r in raw]
    protos = {k: layer.weight.detach().double().requires_grad_() for k, layer in model.prototypes.items()}
    views, pairs = naive_terms(*theirs, protos["views"], protos["pairs"])
    (0.5 * (views + pairs)).backward()
    assert abs(got["loss_swav_views"].item() - 0.5 * views.item()) < 1e-5
    assert abs(got["loss_swav_pairs"].item() - 0.5 * pairs.item()) < 1e-5
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)
    for key, layer in model.prototypes.items():
        assert torch.allclose(layer.weight.grad.double(), protos[key].grad, atol=1e-5), key


def test_prototypes_stay_unit_norm_and_get_no_update_while_frozen():
    model = tiny_model(0.0, None, 4)
    model.add_prototypes(6)
    swav = swav_module(freeze_steps=1)
    views, images, texts = (F.normalize(torch.randn(n, d), dim=-1) for n, d in ((8, 4), (4, 8), (4, 8)))
    with torch.no_grad():
        model.prototypes["pairs"].weight.mul_(3.0)
    grads = []
    for _ in range(2):
        model.zero_grad()
        swav.before_step(model)
        assert torch.allclose(model.prototypes["pairs"].weight.norm(dim=-1), torch.ones(6), atol=1e-6)
        sum(swav(model, views, images, texts).values()).backward()
        grads.append(model.prototypes["pairs"].weight.grad.abs().max().item())
    assert grads[0] == 0.0 and grads[1] > 0.0  # a zero gradient (DDP sees one) in step 0, then learning


def test_the_queue_joins_the_partition_and_only_the_batch_is_scored():
    model = tiny_model(0.0, None, 4)
    model.add_prototypes(6)
    swav = swav_module(queue_size=4)
    first = [F.normalize(torch.randn(n, d), dim=-1) for n, d in ((8, 4), (4, 8), (4, 8))]
    second = [F.normalize(torch.randn(n, d), dim=-1) for n, d in ((8, 4), (4, 8), (4, 8))]
    swav.before_step(model)
    swav(model, *first)  # fills the queue: 4 images, their 8 views and 4 captions
    swav.before_step(model)
    got = swav(model, *second)["loss_swav_pairs"]
    protos = model.prototypes["pairs"].weight.detach()
    both = [torch.cat([second[k], first[k]]) for k in (1, 2)]
    codes = [sinkhorn(b @ protos.T, 0.05, 3)[:4] for b in both]
    logits = [second[k] @ protos.T / 0.1 for k in (1, 2)]
    want = 0.5 * (-(codes[0] * logits[1].log_softmax(-1)).sum(-1).mean() - (codes[1] * logits[0].log_softmax(-1)).sum(-1).mean()) / 2
    assert abs(got.item() - want.item()) < 1e-5
    assert torch.equal(swav.queue_images, second[1]) and swav.filled.tolist() == [8, 4, 4]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gradcache_takes_the_full_batch_step(name):
    grads, terms = [], []
    for chunk in (0, 3):
        model = tiny_model(0.0, -10.0 if name == "siglip" else None, 4)
        model.add_prototypes(6)
        cfg = LossConfig(name=name, swav_weight=0.7)
        objective = Objective(build_loss(cfg), Accelerator(cpu=True), chunk, swav=swav_module(weight=0.7))
        loss, step_terms = objective(model, global_batch(8, views=True))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        terms.append(step_terms)
    assert set(terms[0]) == {"loss_pair", "loss_swav_views", "loss_swav_pairs", "view_std"}
    for key in terms[0]:
        assert torch.allclose(terms[0][key], terms[1][key], atol=1e-5), key
    assert grads[0].keys() == grads[1].keys() and "prototypes.views.weight" in grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5), key


@pytest.mark.slow
def test_a_short_swav_run_keeps_its_view_embeddings_apart(tmp_path, emoji_cache, small_emoji, small_tokenizer):
    """SwAV collapses when every view maps to one point (the codes are then uniform and the loss a
    constant log K): the logged per-dimension spread of the unit-norm views (`train/view_std`) would
    fall toward 0. A random tower starts them close (spread ~0.05 against 1/sqrt(16) = 0.25 spread
    evenly); with the equal partition the spread must grow: the last 5 windows' mean at least 1.2x the
    first window's, with SwAV weighted 5 times the pair loss."""
    from mmcl.training.loop import train
    from tests.losses.test_byol import view_std
    from tests.test_train import debug_config

    metrics = train(debug_config(tmp_path, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null",
                                 "--data.validation_share=0", f"--model.tokenizer={small_tokenizer}",
                                 "--loss.swav_weight=5", "--loss.swav_prototypes=16", "--loss.image_ssl_dim=16",
                                 "--train.max_steps=30", "--train.checkpoint_every=0"))
    assert {"train/loss_swav_views", "train/loss_swav_pairs", "train/view_std"} <= set(metrics)
    spread = view_std(tmp_path)
    assert len(spread) == 15 and sum(spread[-5:]) / 5 > 1.2 * spread[0], spread
