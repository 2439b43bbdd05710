"""Build what `ModelConfig` describes: the dual encoder (pretrained towers, towers from configs, or
a whole CLIP-format checkpoint), its tokenizer and image processor, and the tower freezing.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from . import backbones
from ..artifacts import MODEL_CONFIG_NAME, atomic_dir, check_model_reference, default_cache_dir, load_pretrained
from ..config import BACKBONE_PREFIX, ConfigError, ModelConfig
from .inference import load_hf_dual_encoder
from .lora import apply_lora, is_adapter_weight
from .model import DualEncoder, DualEncoderConfig, tower_from_dict

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


TOKENIZER_RECIPE = "bytelevel-bpe/1"  # part of the cache key: another recipe below is another tokenizer


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing byte-level BPE tokenizer (GPT-2's alphabet: any text, no unknown token in
    practice) trained on `captions` in seconds, with BERT's special tokens around each caption.

    Deterministic: the same captions give the same tokenizer, byte for byte. (WordPiece training in
    `tokenizers` is not: its "##" tokens get ids in hash-map order, which breaks ties between merges
    differently in each process.) [SEP] gets id 3, not 2: CLIP's text pooling takes a legacy path
    when eos_token_id == 2.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())  # else it prints blank lines to stdout
    tok.train_from_iterator(captions, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]")


def cached_tokenizer(captions: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Any:
    """`train_tokenizer`'s result for these captions, reused from `<cache_dir>/tokenizers/<hash>` when a
    run with the same captions and vocabulary size trained it before (the hash covers both and the recipe)."""
    captions = list(captions)
    digest = hashlib.sha256(f"{TOKENIZER_RECIPE}\n{vocab_size}\n".encode())
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\0")
    folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / digest.hexdigest()[:24]
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = train_tokenizer(captions, vocab_size)
    try:
        with atomic_dir(folder, replace=False) as tmp:  # a run beside this one may write the same
            tokenizer.save_pretrained(tmp)
    except OSError:  # an unwritable cache costs the reuse, not the run
        pass
    return tokenizer


def _source(cfg: ModelConfig, explicit: str | None, tower: str | None) -> str | None:
    return explicit or tower or cfg.init_from


def build_tokenizer(cfg: ModelConfig, captions: Iterable[str] | None = None, cache_dir: str | None = None) -> Any:
    """The configured tokenizer; or, for a random-init text tower, one trained on `captions` (cached
    under `cache_dir`, default ~/.cache/mmcl)."""
    source = _source(cfg, cfg.tokenizer, cfg.text_model)
    if source:
        return load_pretrained(AutoTokenizer, source, "tokenizer", cfg.trust_remote_code)
    if captions is None:
        raise ValueError("a random-init text tower needs model.tokenizer or captions to train one on")
    return cached_tokenizer(captions, cfg.tokenizer_vocab_size, cache_dir)


def build_image_processor(cfg: ModelConfig) -> Any:
    """The vision tower's image processor, or a plain resize + normalise to `image_size`."""
    source = _source(cfg, cfg.image_processor, cfg.vision_model)
    backbone = cfg.vision_backbone()
    if backbone is not None and not cfg.image_processor and (cfg.vision_model or not cfg.init_from):
        return backbones.image_processor(backbone, cfg.image_size)
    if source:
        return load_pretrained(AutoImageProcessor, source, "image processor", cfg.trust_remote_code)
    from transformers import ViTImageProcessorPil  # the PIL backend: no torchvision needed

    size = cfg.image_size
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def fit_text_config(cfg: ModelConfig, tokenizer: Any) -> None:
    """Make a random-init text tower's config agree with a tokenizer it was not built for."""
    if cfg.text_model or cfg.init_from:
        return
    cfg.text_config["vocab_size"] = len(tokenizer)
    cfg.text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        cfg.text_config["eos_token_id"] = tokenizer.eos_token_id
        cfg.text_config.setdefault("bos_token_id", tokenizer.bos_token_id)


def build_model(cfg: ModelConfig, init_logit_bias: float | None = None, image_ssl_dim: int | None = None,
                predictor_hidden: int | None = None, swav_prototypes: int | None = None) -> DualEncoder:
    """The dual encoder `cfg` describes, with its towers frozen as configured; with a learned logit
    bias starting at `init_logit_bias` when the loss needs one (SigLIP), and an image–image head of
    width `image_ssl_dim` when the loss has SLIP's, BYOL's or SwAV's term (BYOL's predictor: `predictor_hidden`;
    SwAV's prototypes: `swav_prototypes`)."""
    backbones.trust_configured(cfg)  # the config is the user's own: the backbone it names may load
    if cfg.init_from:
        model = load_initial_model(cfg)
        if init_logit_bias is not None:
            model.add_logit_bias(init_logit_bias)  # a checkpoint that has its own keeps it
        if image_ssl_dim is not None:
            model.add_image_ssl_head(image_ssl_dim)
        if predictor_hidden is not None:
            model.add_predictor(predictor_hidden)
        if swav_prototypes is not None:
            model.add_prototypes(swav_prototypes)
    else:
        text = build_tower(cfg.text_model, cfg.text_config, cfg.trust_remote_code)
        vision = build_tower(cfg.vision_model, cfg.vision_config, cfg.trust_remote_code)
        config = DualEncoderConfig(
            text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),  # rebuilds offline
            text_pooling=cfg.text_pooling, vision_pooling=cfg.vision_pooling,
            projection_dim=cfg.projection_dim, init_temperature=cfg.init_temperature,
            max_logit_scale=cfg.max_logit_scale, init_logit_bias=init_logit_bias, image_ssl_dim=image_ssl_dim,
            predictor_hidden=predictor_hidden, swav_prototypes=swav_prototypes)
        model = DualEncoder(config, text, vision)
    apply_lora(model, cfg)
    apply_freezing(model, cfg)
    apply_activation_checkpointing(model, cfg)
    apply_attention(model, cfg)
    return model


def load_initial_model(cfg: ModelConfig) -> DualEncoder:
    """`init_from`: an mmcl folder, a `CLIPModel`, `SiglipModel` or `VisionTextDualEncoderModel` (folder
    or Hub id). A SigLIP model keeps its own heads (identity projections) and its logit bias."""
    name = cfg.init_from
    if (Path(name) / MODEL_CONFIG_NAME).is_file():
        return DualEncoder.from_pretrained(name).train()
    source = load_hf_dual_encoder(name, ("clip", "siglip", "vision-text-dual-encoder"), cfg.trust_remote_code)
    return DualEncoder.from_hf(source, cfg.init_temperature, cfg.max_logit_scale)


def build_tower(name: str | None, config: dict[str, Any], trust_remote_code: bool) -> PreTrainedModel:
    """A pretrained tower (folder / Hub id), or one at random init from a config dict with `model_type`."""
    if name and name.startswith(BACKBONE_PREFIX):
        return backbones.pretrained_tower(name)
    if name:
        check_model_reference(name)
        return load_pretrained(AutoModel, name, "weights", trust_remote_code)
    return tower_from_dict(config)


def _blocks(tower: nn.Module) -> nn.ModuleList:
    """The tower's stack of transformer blocks / stages: its largest ModuleList."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"cannot find the layer stack of {type(tower).__name__} to unlock")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _lock(tower: nn.Module, unlocked_layers: int) -> None:
    """Freeze a tower except its last `unlocked_layers` blocks and everything after them, and its
    LoRA adapters."""
    names = [n for n, _ in tower.named_parameters()]
    keep_from = len(names)
    if unlocked_layers > 0:
        blocks = _blocks(tower)
        if unlocked_layers > len(blocks):
            raise ConfigError(f"cannot unlock the last {unlocked_layers} layers of {type(tower).__name__}: "
                              f"it has {len(blocks)}")
        first = {id(p) for p in blocks[-unlocked_layers].parameters()}
        keep_from = next(i for i, (_, p) in enumerate(tower.named_parameters()) if id(p) in first)
    for i, (name, param) in enumerate(tower.named_parameters()):
        param.requires_grad_(i >= keep_from or is_adapter_weight(name))


def apply_freezing(model: DualEncoder, cfg: ModelConfig) -> None:
    """LiT and friends: `lock_vision` / `lock_text` (and a tower with LoRA adapters), keeping the last
    `unlock_*_layers` blocks trainable."""
    for key in ("text", "vision"):
        if getattr(cfg, f"lock_{key}") or key in cfg.lora:
            _lock(getattr(model, f"{key}_model"), getattr(cfg, f"unlock_{key}_layers"))


def apply_activation_checkpointing(model: DualEncoder, cfg: ModelConfig) -> None:
    """`model.{text,vision}_activation_checkpointing`: transformers' own, non-reentrant (so it works
    under DDP and FSDP, and with a partly frozen tower). The step it takes is the same."""
    for key, tower in (("text", model.text_model), ("vision", model.vision_model)):
        if not getattr(cfg, f"{key}_activation_checkpointing"):
            continue
        if not getattr(tower, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.{key}_activation_checkpointing: {type(tower).__name__} does not support "
                              "activation checkpointing; set it to false")
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if cfg.activation_checkpointing_policy == "selective":
            kwargs["context_fn"] = keep_matmuls
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def keep_matmuls() -> Any:
    """Selective activation checkpointing (torch's): in backward, a block's forward runs again, but
    its matmuls and attention return their kept outputs; the cheap ops (norms, activations, dtype
    casts, sums) are recomputed. The outputs and the gradients are those without checkpointing."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    kept = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_cudnn_attention.default}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_attention(model: DualEncoder, cfg: ModelConfig) -> None:
    """`model.attn_implementation` for both towers (the same math; another kernel). Empty, or an `auto`
    that training setup has not resolved (mmcl/training/auto.py): the towers' default."""
    if not cfg.attn_implementation or cfg.attn_implementation == "auto":
        return
    for tower in (model.text_model, model.vision_model):
        if not hasattr(tower, "set_attn_implementation"):  # a backbone tower (convolutions): no attention to set
            continue
        try:
            tower.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError, AttributeError) as error:
            raise ConfigError(f"model.attn_implementation={cfg.attn_implementation!r}: {type(tower).__name__} "
                              f"refused it ({str(error).splitlines()[0]}); use sdpa or eager") from error
