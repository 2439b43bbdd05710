"""A CLIP-style dual encoder exported by mmcl, for plain transformers (this file travels with the
model folder; mmcl is not needed to use it, and mmcl never imports it).

Two transformers towers (rebuilt from their configs in config.json), each pooled as the model was
trained (`pooler`: the tower's pooler_output; `cls`: the first token; `mean`: the mean over tokens
where the attention mask is 1, or over patches), a linear projection each into one embedding space,
and a learned temperature. Load it with

    AutoModel.from_pretrained(folder, trust_remote_code=True)

`forward` returns unit-norm `text_embeds` and `image_embeds` and, given both, `logits_per_image` /
`logits_per_text` scaled by the learned temperature (plus the learned bias of a SigLIP-loss model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

TOWER_CLASSES = {"siglip_text_model": "SiglipTextModel", "siglip_vision_model": "SiglipVisionModel"}


class MmclDualEncoderConfig(PretrainedConfig):
    model_type = "mmcl_dual_encoder"

    def __init__(self, text_tower: dict | None = None, vision_tower: dict | None = None, text_pooling: str = "pooler",
                 vision_pooling: str = "pooler", projection_dim: int = 512, text_width: int = 0,
                 vision_width: int = 0, identity_projection: bool = False, has_logit_bias: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_tower, self.vision_tower = dict(text_tower or {}), dict(vision_tower or {})
        self.text_pooling, self.vision_pooling = text_pooling, vision_pooling
        self.projection_dim, self.text_width, self.vision_width = projection_dim, text_width, vision_width
        self.identity_projection, self.has_logit_bias = identity_projection, has_logit_bias


@dataclass
class MmclDualEncoderOutput(ModelOutput):
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None


def build_tower(values: dict) -> PreTrainedModel:
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    if config.model_type in TOWER_CLASSES:
        import transformers

        return getattr(transformers, TOWER_CLASSES[config.model_type])(config)
    return AutoModel.from_config(config)


def pool(outputs, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "pooler":
        return outputs.pooler_output.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:  # a convolutional map
        return hidden.mean(dim=(2, 3))
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MmclDualEncoderModel(PreTrainedModel):
    config_class = MmclDualEncoderConfig
    base_model_prefix = "mmcl"

    def __init__(self, config: MmclDualEncoderConfig) -> None:
        super().__init__(config)
        self.text_model = build_tower(config.text_tower)
        self.vision_model = build_tower(config.vision_tower)
        for tower, how in ((self.text_model, config.text_pooling), (self.vision_model, config.vision_pooling)):
            if how != "pooler" and isinstance(getattr(tower, "pooler", None), nn.Module):
                if any(True for _ in tower.pooler.parameters()):
                    tower.pooler = None  # unused by this pooling: the trained model has no such head
        if config.identity_projection:
            self.text_projection, self.visual_projection = nn.Identity(), nn.Identity()
        else:
            self.text_projection = nn.Linear(config.text_width, config.projection_dim, bias=False)
            self.visual_projection = nn.Linear(config.vision_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1)) if config.has_logit_bias else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module in (self.text_projection, self.visual_projection):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm text embeddings, (B, D)."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_projection(pool(outputs, attention_mask, self.config.text_pooling)), dim=-1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings, (B, D)."""
        outputs = self.vision_model(pixel_values=pixel_values)
        return F.normalize(self.visual_projection(pool(outputs, None, self.config.vision_pooling)), dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **kwargs) -> MmclDualEncoderOutput:
        text = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
        image = None if pixel_values is None else self.get_image_features(pixel_values)
        out = MmclDualEncoderOutput(text_embeds=text, image_embeds=image)
        if text is not None and image is not None:
            logits = self.logit_scale.exp() * image @ text.T
            if self.logit_bias is not None:
                logits = logits + self.logit_bias
            out.logits_per_image, out.logits_per_text = logits, logits.T
        return out
