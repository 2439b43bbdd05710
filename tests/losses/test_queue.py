"""The MoCo-style queue: FIFO contents, the momentum (EMA) copy, and the loss it feeds, each
checked against a hand-written reference. (2 processes and resume: tests/losses/test_distributed.py
and tests/test_train.py.)"""

import copy

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mmcl.losses import ClipLoss, FeatureQueue, Negatives
from mmcl.losses.objective import Objective
from tests.losses.cache_worker import global_batch, tiny_model


def test_fifo_keeps_the_newest_rows():
    queue = FeatureQueue(size=8, dim=2, momentum=0.0)
    pushed = []
    for step, rows in enumerate([3, 4, 5, 11]):
        images = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 100 * step
        ids = torch.arange(rows) + 100 * step
        queue.push(images, -images, ids, ids + 1)
        pushed += [tuple(r) for r in images.tolist()]
        newest = pushed[-8:]
        negatives = queue.negatives()
        assert sorted(map(tuple, negatives.images.tolist())) == sorted(newest)
        assert torch.equal(negatives.texts, -negatives.images)
        assert torch.equal(negatives.text_ids, negatives.image_ids + 1)
        assert int(queue.filled) == min(8, len(pushed))


def test_momentum_copy_moves_once_per_optimizer_step():
    model = torch.nn.Linear(3, 2)
    queue = FeatureQueue(size=4, dim=2, momentum=0.75, model=model, accumulation_steps=2)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight += 1.0
    queue.before_step(model)  # micro-batch 1 of step 1: moves
    moved = 0.75 * start["weight"] + 0.25 * model.weight
    assert torch.allclose(queue.momentum_model.weight, moved)
    with torch.no_grad():
        model.weight += 1.0
    queue.before_step(model)  # micro-batch 2 of step 1: the parameters are those of the same step
    assert torch.allclose(queue.momentum_model.weight, moved)
    queue.before_step(model)  # step 2
    assert torch.allclose(queue.momentum_model.weight, 0.75 * moved + 0.25 * model.weight)
    assert not any(p.requires_grad for p in queue.momentum_model.parameters())


def test_second_step_sees_the_first_steps_momentum_embeddings():
    acc = Accelerator(cpu=True)
    model = tiny_model(0.0, None).train()
    key_model = copy.deepcopy(model).eval()
    queue = FeatureQueue(size=32, dim=model.embed_dim, momentum=0.9, model=model)
    objective = Objective(ClipLoss(), acc, queue=queue)
    first, second = global_batch(6), {k: v + (100 if k.endswith("_ids") and k != "input_ids" else 0)
                                      for k, v in global_batch(6).items()}
    inputs = ("input_ids", "attention_mask", "pixel_values")
    out = model(**{k: first[k] for k in inputs})
    assert objective(model, dict(first))[0].item() == ClipLoss()(out, first["image_ids"], first["text_ids"]).item()
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step
            p.add_(0.01 * torch.randn_like(p))
        keys = key_model(**{k: first[k] for k in inputs})  # the copy had not moved before step 1
        for mine, theirs in zip(key_model.parameters(), model.parameters()):
            mine.copy_(0.9 * mine + 0.1 * theirs)  # what it holds for step 2
    got, terms = objective(model, dict(second))
    assert terms["loss_pair"].item() == got.item()  # the only term
    out = model(**{k: second[k] for k in inputs})
    negatives = Negatives(texts=keys.text_embeds, images=keys.image_embeds, image_ids=first["image_ids"],
                          text_ids=first["text_ids"])
    want = ClipLoss()(out, second["image_ids"], second["text_ids"], negatives)
    assert abs(got.item() - want.item()) < 1e-6
    assert abs(got.item() - ClipLoss()(out, second["image_ids"], second["text_ids"]).item()) > 1e-4
    assert int(queue.filled) == 12
    for a, b in zip(queue.momentum_model.parameters(), key_model.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert torch.allclose(queue.texts[6:12].norm(dim=-1), torch.ones(6))
    assert F.cosine_similarity(queue.images[:6], keys.image_embeds).min() > 1 - 1e-6
