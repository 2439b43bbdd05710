"""BYOL's term: the loss against a float64 loop reference (value and gradient, the target detached),
the EMA schedule, one EMA move per optimizer step under accumulation (only the vision tower and the
head move), GradCache giving the full-batch step with the views carried through the cache, and no
collapse in a short training run."""

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mmcl.losses import BYOL, build_loss, byol_loss
from mmcl.config import LossConfig
from mmcl.losses.objective import Objective
from tests.losses.cache_worker import global_batch, tiny_model


def naive_byol(predictions, targets):
    """BYOL's loss as written in the paper, from raw (not normalised) vectors: for each view a of image i,
    || p_a / ||p_a|| - z_b / ||z_b|| ||^2 with b the other view of image i; the mean over views."""
    total = 0.0
    for a in range(len(predictions)):
        b = a + 1 if a % 2 == 0 else a - 1
        p, z = predictions[a] / predictions[a].norm(), targets[b] / targets[b].norm()
        total = total + ((p - z) ** 2).sum()
    return total / len(predictions)


def test_value_and_gradient_match_the_naive_reference_and_the_target_gets_none():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, 5, generator=g, dtype=torch.float64)  # raw: the model normalises its outputs
    z = torch.randn(8, 5, generator=g, dtype=torch.float64)
    got_p, want_p, got_z = p.clone().requires_grad_(), p.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = byol_loss(F.normalize(got_p, dim=-1), F.normalize(got_z, dim=-1)), naive_byol(want_p, z)
    assert abs(got.item() - want.item()) < 1e-6
    got.backward()
    want.backward()
    assert torch.allclose(got_p.grad.double(), want_p.grad, atol=1e-6)
    assert got_z.grad is None  # the target is not trained by the loss
    z = F.normalize(z, dim=-1)
    assert byol_loss(z, z.view(4, 2, 5).flip(1).reshape(8, 5)).item() < 1e-6  # each view predicts its partner
    assert abs(naive_byol(p, z).item() - byol_loss(F.normalize(p, dim=-1), z.roll(2, 0)).item()) > 1e-3


def test_the_ema_rate_rises_from_its_base_to_one_on_a_cosine():
    byol = BYOL(1.0, 0.99, tiny_model(0.0, None, 4), max_steps=100)
    rates = [byol.momentum(k) for k in range(101)]
    assert rates[0] == pytest.approx(0.99) and rates[100] == pytest.approx(1.0) and rates[50] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(rates, rates[1:]))


def test_the_target_moves_once_per_optimizer_step_and_only_its_vision_side():
    model = tiny_model(0.0, None, 4)
    model.add_predictor(6)
    byol = BYOL(1.0, 0.5, model, max_steps=1000, accumulation_steps=2)
    assert {n.split(".")[0] for n, _ in byol.target.named_parameters()} == {"vision_model", "image_ssl_head"}
    moved = []
    for call in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)  # the online model changes between micro-batches
        before = byol.target.vision_model.embeddings.cls_token.clone()
        byol.before_step(model)
        moved.append(not torch.equal(before, byol.target.vision_model.embeddings.cls_token))
    assert moved == [True, False, True, False]  # the first micro-batch of each optimizer step
    online, target = model.vision_model.embeddings.cls_token, byol.target.vision_model.embeddings.cls_token
    assert not torch.equal(online, target) and int(byol.calls) == 4


def test_with_lora_the_target_follows_the_merged_weights_not_the_factors():
    """The target averages each adapted layer's effective weight (base + update); its own adapters stay
    zero. Averaging the factors apart (or copying them beside the merged weight) gives another network."""
    from mmcl.config import LoraSpec
    from mmcl.losses.byol import TargetNetwork
    from mmcl.towers.lora import add_adapters

    model = tiny_model(0.0, None, 4)
    add_adapters(model.vision_model, LoraSpec(r=2, target_modules=["q_proj", "v_proj"]), "vision")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.3)  # a trained update (a fresh one is zero)
    views = global_batch(4, views=True)["view_pixel_values"]
    target = TargetNetwork(model)
    with torch.no_grad():
        online = model(view_pixel_values=views).view_embeds
        assert torch.allclose(target(views), online, atol=1e-6)  # at the start: the online network itself
        query = model.vision_model.layers[0].attention.q_proj
        merged = query.base_layer.weight + query.get_delta_weight("default")
        before = target.vision_model.layers[0].attention.q_proj.base_layer.weight.clone()
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.add_(0.1)
        merged = query.base_layer.weight + query.get_delta_weight("default")
        target.follow(model, 0.75)
    got = target.vision_model.layers[0].attention.q_proj.base_layer.weight
    assert torch.allclose(got, 0.75 * before + 0.25 * merged, atol=1e-6)


def objective(cache_chunk):
    model = tiny_model(0.0, None, 4)
    model.add_predictor(6)
    cfg = LossConfig(byol_weight=0.7, byol_momentum=0.9)
    byol = BYOL(cfg.byol_weight, cfg.byol_momentum, model, max_steps=10)
    return model, Objective(build_loss(cfg), Accelerator(cpu=True), cache_chunk, byol=byol)


def test_gradcache_carries_the_views_and_takes_the_full_batch_step():
    grads, losses = [], []
    for chunk in (0, 3):
        model, obj = objective(chunk)
        loss, terms = obj(model, global_batch(8, views=True))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(terms)
    assert set(losses[0]) == {"loss_pair", "loss_byol", "view_std"} and losses[0]["loss_byol"] > 0
    for key in losses[0]:
        assert torch.allclose(losses[0][key], losses[1][key], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("predictor.") for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def view_std(tmp_path) -> list[float]:
    """The logged collapse signal per log window of a run in `tmp_path`."""
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [line["train/view_std"] for line in lines if "train/view_std" in line]


@pytest.mark.slow
def test_a_short_byol_run_keeps_its_view_embeddings_apart(tmp_path, emoji_cache, small_emoji, small_tokenizer):
    """Collapse (every view mapped to one point) drives the per-dimension spread of the unit-norm
    views toward 0; a random tower starts them close together already (mean cosine ~0.98, spread
    ~0.03 against 1/sqrt(16) = 0.25 when spread evenly). Without the predictor's batch norm this run
    collapsed (spread 0.031 -> 0.011 in 30 steps); with it the spread must grow, not shrink: the
    last 5 windows' mean at least 1.2x the first window's, with BYOL weighted 5 times the pair loss."""
    from safetensors.torch import load_file

    from mmcl.training.loop import train
    from tests.test_train import debug_config

    metrics = train(debug_config(tmp_path, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null",
                                 "--data.validation_share=0", f"--model.tokenizer={small_tokenizer}",
                                 "--loss.byol_weight=5", "--loss.image_ssl_dim=16", "--train.max_steps=30",
                                 "--train.checkpoint_every=0"))
    assert "train/loss_byol" in metrics and "train/view_std" in metrics
    assert "predictor.0.weight" in load_file(tmp_path / "final" / "model.safetensors")
    spread = view_std(tmp_path)
    assert len(spread) == 15 and sum(spread[-5:]) / 5 > 1.2 * spread[0], spread  # the last 5 windows: less noise


def test_with_siglip_and_a_locked_vision_tower_the_head_and_predictor_still_learn():
    """LiT-style: the vision tower locked, BYOL trains the head and the predictor (and the target
    follows the head); the pair loss is SigLIP's."""
    model = tiny_model(0.0, -10.0, 4)
    model.add_predictor(6)
    model.vision_model.requires_grad_(False)
    cfg = LossConfig(name="siglip", byol_weight=0.5)
    byol = BYOL(cfg.byol_weight, cfg.byol_momentum, model, max_steps=10)
    loss, terms = Objective(build_loss(cfg), Accelerator(cpu=True), 0, byol=byol)(model, global_batch(8, views=True))
    loss.backward()
    assert torch.isfinite(loss) and terms["loss_byol"] > 0 and model.logit_bias.grad is not None
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(p.grad is not None for p in [*model.image_ssl_head.parameters(), *model.predictor.parameters()])
