"""Conversion between mmcl's format and the CLIP formats of transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel

from .config import ModelConfig
from .model import CONFIG_NAME, DualEncoder, DualEncoderConfig


def load_clip_format(name: str, cfg: ModelConfig) -> DualEncoder:
    """Start from an mmcl folder, a `CLIPModel` or a `VisionTextDualEncoderModel` (folder or Hub id).

    Their towers (`CLIPTextModel` / `CLIPVisionModel`, or any pair) project `pooler_output`
    (CLIP: the EOS token / the post-normed CLS), so the dual encoder uses pooling "pooler".
    """
    if (Path(name) / CONFIG_NAME).is_file():
        return DualEncoder.from_pretrained(name).train()
    config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    source = AutoModel.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    if config.model_type not in ("clip", "vision-text-dual-encoder"):
        raise ValueError(f"{name} is a '{config.model_type}' model; init_from takes an mmcl folder, "
                         "a CLIPModel or a VisionTextDualEncoderModel")
    # both hold full tower models whose pooler_output is what they project
    text, vision = source.text_model, source.vision_model
    dual = DualEncoder(DualEncoderConfig(
        text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
        text_pooling="pooler", vision_pooling="pooler",
        projection_dim=source.text_projection.out_features,
        init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale), text, vision)
    dual.text_projection.load_state_dict(source.text_projection.state_dict())
    dual.visual_projection.load_state_dict(source.visual_projection.state_dict())
    dual.logit_scale.data.copy_(source.logit_scale.data)
    return dual
