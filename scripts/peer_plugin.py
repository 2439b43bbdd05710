"""mmcl as contestants of shared/bench/peer_train.py, through mmcl's own model, loss and training step.

The project's copy of the harness plugin (the harness's own copy imports mmcl's pre-restructuring
module paths). Run from the harness folder, naming this file:
    $PY peer_train.py run --plugin /path/to/mmcl/scripts/peer_plugin.py --contestants open_clip mmcl_clip ...
`peer_train` is imported from MMCL_PEER_BENCH, else from ../shared/bench beside the repository.

  mmcl_clip : DualEncoder with CLIPTextModel + CLIPVisionModel towers built from configs (the
              architecture of open_clip.CLIP: pre-LN, causal text, EOS/CLS poolers, and GELU, as
              open_clip's default; transformers' CLIP configs default to quick_gelu), with mmcl's
              defaults: attn_implementation and optim `auto`, resolved for this device at the harness's
              precision as a run resolves them (mmcl/training/auto.py).
  mmcl_clip_plain : the same towers with SDPA attention and multi-tensor AdamW (the defaults before `auto`).
  mmcl_clip_fast : the same towers with eager attention and fused AdamW, whatever the precision.
  mmcl_clip_lean : mmcl_clip (the defaults) with model.{text,vision}_activation_checkpointing=true.
  mmcl_clip_selective : mmcl_clip_lean with model.activation_checkpointing_policy=selective (the
              matmul and attention outputs kept; norms, activations, casts and sums recomputed).
  mmcl_bert : DualEncoder with BERT + ViT towers, mean/cls pooling (what mmcl's quickstart uses).
All are built by mmcl.towers.build.build_model from a ModelConfig and run mmcl.training.loop.training_step under
an Accelerator (mixed_precision no|bf16 on CPU = autocast), with mmcl's optimizer (its parameter
groups; lr 1e-4, wd 0.1 as the harness), no grad clipping (max_grad_norm=None, as open_clip's
default), and clamp_logit_scale after each step.
"""
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("MMCL_PEER_BENCH", os.path.join(_REPO, "..", "shared", "bench")))
from peer_train import LR, WD, Contestant  # noqa: E402


def _contestant(arch, precision, text_config, vision_config, text_pooling, vision_pooling, notes, **options):
    import torch
    from accelerate import Accelerator

    import mmcl.training.loop as mt
    from mmcl.training.optimization import build_optimizer
    from mmcl.towers.build import build_model
    from mmcl.config import ModelConfig, TrainConfig
    from mmcl.losses import ClipLoss, Objective

    from mmcl.training.auto import detect_device, resolve_auto

    mcfg = ModelConfig(text_config=text_config, vision_config=vision_config, text_pooling=text_pooling,
                       vision_pooling=vision_pooling, projection_dim=arch["embed_dim"],
                       attn_implementation=options.get("attn_implementation", "auto"),
                       text_activation_checkpointing=bool(options.get("checkpointing")),
                       vision_activation_checkpointing=bool(options.get("checkpointing")),
                       activation_checkpointing_policy=options.get("checkpointing") or "full")
    tcfg = TrainConfig(learning_rate=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                       max_grad_norm=None, mixed_precision={"fp32": "no"}.get(precision, precision),
                       optim=options.get("optim", "auto"))
    chosen = resolve_auto(mcfg, tcfg, detect_device())  # the harness fixes the precision; the rest as a run
    model = build_model(mcfg).train()
    acc = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=True)
    opt = build_optimizer(model, tcfg)
    pmodel, opt = acc.prepare(model, opt)
    loss_fn = ClipLoss()
    objective = Objective(loss_fn, acc)  # what mmcl's loop calls: objective(model, batch)
    mask = {}

    def batch(pixels, tokens):
        if tokens.shape not in mask:
            mask[tokens.shape] = torch.ones_like(tokens)
        return {"pixel_values": pixels, "input_ids": tokens, "attention_mask": mask[tokens.shape]}

    def forward_loss(pixels, tokens):
        with acc.autocast():
            out = pmodel(**batch(pixels, tokens))
            return loss_fn(out)

    def step(pixels, tokens):
        loss = mt.training_step(acc, pmodel, objective, opt, batch(pixels, tokens), None).loss
        model.clamp_logit_scale()
        return float(loss)

    import mmcl
    return Contestant(model=model, step=step, forward_loss=forward_loss, analytic_extra={}, logits_matmuls=2,
                      notes=f"mmcl {getattr(mmcl, '__version__', '?')}; {notes}; {'; '.join(chosen) or 'no auto'}")


def _clip_towers(arch):
    w, m = arch["text_width"], arch["mlp_ratio"]
    text = dict(model_type="clip_text_model", vocab_size=arch["vocab_size"], hidden_size=w,
                intermediate_size=w * m, num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
                max_position_embeddings=arch["context_length"], eos_token_id=arch["vocab_size"] - 1,
                hidden_act="gelu")
    vw = arch["vision_width"]
    vision = dict(model_type="clip_vision_model", hidden_size=vw, intermediate_size=vw * m,
                  num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"],
                  image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_act="gelu")
    return text, vision


def build_mmcl_clip(arch, precision):
    return _contestant(arch, precision, *_clip_towers(arch), "pooler", "pooler",
                       "CLIPTextModel + CLIPVisionModel towers (GELU), pooler pooling, mmcl's defaults")


def build_mmcl_clip_plain(arch, precision):
    return _contestant(arch, precision, *_clip_towers(arch), "pooler", "pooler",
                       "CLIP towers (GELU), SDPA attention, multi-tensor AdamW",
                       attn_implementation="sdpa", optim="adamw_torch")


def build_mmcl_clip_fast(arch, precision):
    return _contestant(arch, precision, *_clip_towers(arch), "pooler", "pooler",
                       "CLIP towers (GELU), model.attn_implementation=eager, train.optim=adamw_torch_fused",
                       attn_implementation="eager", optim="adamw_torch_fused")


def build_mmcl_clip_lean(arch, precision):
    return _contestant(arch, precision, *_clip_towers(arch), "pooler", "pooler",
                       "CLIP towers (GELU), mmcl's defaults and activation checkpointing in both towers",
                       checkpointing="full")


def build_mmcl_clip_selective(arch, precision):
    return _contestant(arch, precision, *_clip_towers(arch), "pooler", "pooler",
                       "CLIP towers (GELU), mmcl_clip_fast's options and selective activation checkpointing",
                       attn_implementation="eager", optim="adamw_torch_fused", checkpointing="selective")


def build_mmcl_bert(arch, precision):
    w, m = arch["text_width"], arch["mlp_ratio"]
    text = dict(model_type="bert", vocab_size=arch["vocab_size"], hidden_size=w, intermediate_size=w * m,
                num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
                max_position_embeddings=arch["context_length"])
    vw = arch["vision_width"]
    vision = dict(model_type="vit", hidden_size=vw, intermediate_size=vw * m, num_hidden_layers=arch["vision_layers"],
                  num_attention_heads=arch["vision_heads"], image_size=arch["image_size"], patch_size=arch["patch_size"])
    return _contestant(arch, precision, text, vision, "mean", "cls", "BERT + ViT towers, mean/cls pooling (quickstart)")


def mmcl_loss_factory():
    from mmcl.losses import ClipLoss
    from mmcl.towers.model import DualEncoderOutput
    import torch
    lf = ClipLoss()
    return lambda img, txt, s: lf(DualEncoderOutput(img, txt, torch.log(torch.as_tensor(s))))


def register(contestants, losses):
    contestants["mmcl_clip"] = build_mmcl_clip
    contestants["mmcl_clip_plain"] = build_mmcl_clip_plain
    contestants["mmcl_clip_fast"] = build_mmcl_clip_fast
    contestants["mmcl_clip_lean"] = build_mmcl_clip_lean
    contestants["mmcl_clip_selective"] = build_mmcl_clip_selective
    contestants["mmcl_bert"] = build_mmcl_bert
    losses["mmcl_loss"] = mmcl_loss_factory
