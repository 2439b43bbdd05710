"""The dual encoder: a Hugging Face text tower and vision tower, a linear projection each into
one embedding space, and a learned temperature.

`forward` returns L2-normalised `image_embeds` (B, D), `text_embeds` (B, D) and `logit_scale`
(the log of the inverse temperature). The contrastive loss lives in `mmcl.loss`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "mmcl_config.json"


@dataclass
class DualEncoderConfig:
    """What `from_pretrained` needs to rebuild the architecture (the weights come separately)."""

    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    text_pooling: str = "pooler"
    vision_pooling: str = "pooler"
    projection_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    extra: dict[str, Any] = field(default_factory=dict)  # free metadata (training config, ...)


@dataclass
class DualEncoderOutput:
    image_embeds: torch.Tensor | None  # (B, D), unit norm
    text_embeds: torch.Tensor | None  # (B, D), unit norm
    logit_scale: torch.Tensor  # scalar, ln(1 / temperature)


def _hidden_size(config: PretrainedConfig) -> int:
    for name in ("projection_dim_in", "hidden_size", "d_model", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    sizes = getattr(config, "hidden_sizes", None)  # ConvNeXt, ResNet: the last stage's width
    if sizes:
        return sizes[-1]
    raise ValueError(f"cannot tell the output width of a {type(config).__name__}; set its hidden_size")


def _tower_from_dict(config: dict[str, Any]) -> PreTrainedModel:
    config = dict(config)
    model_type = config.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


def pool(outputs: Any, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Reduce a tower's outputs to one vector per example, (B, H).

    pooler: the model's own `pooler_output` (BERT's tanh head, CLIP's EOS token, ViT's CLS...).
    cls: the first token of `last_hidden_state`. mean: the mean over tokens (text: only where
    `attention_mask` is 1; vision: over patches, or over H and W for convolutional maps).
    """
    if how == "pooler":
        pooled = outputs.pooler_output
        if pooled is None:
            raise ValueError("this tower has no pooler_output; use pooling 'cls' or 'mean'")
        return pooled.flatten(1)  # ResNet pools to (B, C, 1, 1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:  # convolutional map (B, C, H, W)
        if how == "cls":
            raise ValueError("a convolutional tower has no CLS token; use pooling 'pooler' or 'mean'")
        return hidden.mean(dim=(2, 3))
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class DualEncoder(nn.Module):
    """Two towers + projections + temperature; see the module docstring for the contract."""

    def __init__(self, config: DualEncoderConfig, text_model: PreTrainedModel | None = None,
                 vision_model: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.text_model = text_model or _tower_from_dict(config.text_config)
        self.vision_model = vision_model or _tower_from_dict(config.vision_config)
        # A pooler head that the pooling choice never calls would get no gradient, which DDP
        # rejects; drop it (BERT, ViT and most towers skip a pooler that is None).
        for tower, how in ((self.text_model, config.text_pooling), (self.vision_model, config.vision_pooling)):
            if how != "pooler" and isinstance(getattr(tower, "pooler", None), nn.Module):
                if any(True for _ in tower.pooler.parameters()):
                    tower.pooler = None
        text_width = _hidden_size(self.text_model.config)
        vision_width = _hidden_size(self.vision_model.config)
        # No bias, as in CLIP: keeps export to CLIPModel / VisionTextDualEncoderModel exact.
        self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs: Any) -> torch.Tensor:
        """(B, T) token ids -> (B, D) unit-norm text embeddings."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = pool(outputs, attention_mask, self.config.text_pooling)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, D) unit-norm image embeddings."""
        outputs = self.vision_model(pixel_values=pixel_values)
        pooled = pool(outputs, None, self.config.vision_pooling)
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **text_kwargs: Any) -> DualEncoderOutput:
        text_embeds = image_embeds = None
        if input_ids is not None:
            text_embeds = self.get_text_features(input_ids, attention_mask, **text_kwargs)
        if pixel_values is not None:
            image_embeds = self.get_image_features(pixel_values)
        return DualEncoderOutput(image_embeds, text_embeds, self.logit_scale)

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for tower in (self.text_model, self.vision_model):
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()  # a locked tower keeps dropout off and BatchNorm statistics fixed
        return self

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature >= 1/max_logit_scale (CLIP clamps at 100); call after each step."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Weights as one safetensors file plus `mmcl_config.json`; nothing is pickled."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / WEIGHTS_NAME))
        with open(path / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(asdict(self.config), f, indent=2, default=str)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DualEncoder":
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not an mmcl model folder")
        with open(path / CONFIG_NAME, encoding="utf-8") as f:
            model = cls(DualEncoderConfig(**json.load(f)))
        load_model(model, str(path / WEIGHTS_NAME))
        return model.eval()


def _tower_dict(model: PreTrainedModel) -> dict[str, Any]:
    # to_dict keeps model_type; diff-free dicts rebuild the exact architecture offline
    return model.config.to_dict()


def build_model(cfg: ModelConfig) -> DualEncoder:
    """Build the dual encoder that `cfg` describes (pretrained towers, configs, or a checkpoint)."""
    if cfg.init_from:
        from .convert import load_clip_format

        model = load_clip_format(cfg.init_from, cfg)
    else:
        text = _load_tower(cfg.text_model, cfg.text_config, cfg.trust_remote_code)
        vision = _load_tower(cfg.vision_model, cfg.vision_config, cfg.trust_remote_code)
        config = DualEncoderConfig(
            text_config=_tower_dict(text), vision_config=_tower_dict(vision),
            text_pooling=cfg.text_pooling, vision_pooling=cfg.vision_pooling,
            projection_dim=cfg.projection_dim, init_temperature=cfg.init_temperature,
            max_logit_scale=cfg.max_logit_scale)
        model = DualEncoder(config, text, vision)
    apply_freezing(model, cfg)
    return model


def _load_tower(name: str | None, config: dict[str, Any], trust_remote_code: bool) -> PreTrainedModel:
    if name:
        return AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    return _tower_from_dict(config)


def _blocks(tower: nn.Module) -> nn.ModuleList:
    """The tower's stack of transformer blocks / stages: its largest ModuleList."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the layer stack of {type(tower).__name__} to unlock")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _lock(tower: nn.Module, unlocked_layers: int) -> None:
    """Freeze a tower except its last `unlocked_layers` blocks and everything after them."""
    names = [n for n, _ in tower.named_parameters()]
    keep_from = len(names)
    if unlocked_layers > 0:
        blocks = _blocks(tower)
        if unlocked_layers > len(blocks):
            raise ValueError(f"cannot unlock the last {unlocked_layers} layers of {type(tower).__name__}: "
                             f"it has {len(blocks)}")
        first = {id(p) for p in blocks[-unlocked_layers].parameters()}
        keep_from = next(i for i, (_, p) in enumerate(tower.named_parameters()) if id(p) in first)
    for i, (_, param) in enumerate(tower.named_parameters()):
        param.requires_grad_(i >= keep_from)


def apply_freezing(model: DualEncoder, cfg: ModelConfig) -> None:
    if cfg.lock_vision:
        _lock(model.vision_model, cfg.unlock_vision_layers)
    if cfg.lock_text:
        _lock(model.text_model, cfg.unlock_text_layers)
