"""Vision towers beyond transformers' AutoModel: the backbone adapter contract.

A backbone is any torch module that maps `pixel_values` (B, 3, H, W) to pooled features (B, width).
Describe it with a `Backbone` (how to build it at random init, its width, its preprocessing, and
optionally how to load pretrained weights and how to express it as a transformers model for
export), then name it in a config:

    model.vision_model: backbone:efficientnet-lite0          # pretrained weights
    model.vision_config: {model_type: mmcl_backbone, backbone: efficientnet-lite0}  # random init

A name is one of `BACKBONES`, or `package.module:attribute` naming a `Backbone` in your own code
(imported as it is installed: a model folder names the backbone, it never brings code).
`BackboneTower` wraps the module as a tower: it returns the features as `pooler_output`, so every
pooling choice gives the same vector. The trained model saves and loads like any mmcl model (the
weights are the tower's state dict; the config names the backbone).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import efficientnet
from ..config import BACKBONE_MODEL_TYPE as MODEL_TYPE
from ..config import ConfigError
from ..config import BACKBONE_PREFIX as PREFIX



@dataclass(frozen=True)
class Backbone:
    """build(options) -> a module mapping (B, 3, H, W) pixels to (B, width) features, at random init.
    Preprocessing: pixels / 255, then (x - image_mean) / image_std, at `image_size` (a config's
    model.image_size overrides it). load_pretrained(module) fills pretrained weights in place.
    to_transformers(module) -> a transformers model whose `pooler_output` is the same features
    (export uses it; without one, an export has no route that loads without mmcl)."""

    build: Callable[[dict[str, Any]], nn.Module]
    width: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_size: int = 224
    load_pretrained: Callable[[nn.Module], None] | None = None
    to_transformers: Callable[[nn.Module], Any] | None = None


BACKBONES: dict[str, Backbone] = {}


_TRUSTED: set[str] = set()  # backbones in the user's own code that may be imported ("*": any)


def trust_backbone(name: str = "*") -> None:
    """Allow importing the backbone `name` (`package.module:attribute`; "*": any). A config names its
    backbone itself (config files are the user's); a model folder or checkpoint is data, and the
    backbone it names is imported only when the user says so (`--trust-backbone`,
    `model.trust_backbone`), as transformers' `trust_remote_code`."""
    _TRUSTED.add(name)


def trust_configured(cfg: Any) -> None:
    """What a `ModelConfig` the user wrote trusts: any backbone under `model.trust_backbone`, else the one
    it names itself (a model it starts from, `init_from`, is data: its backbone needs the flag)."""
    if cfg.trust_backbone:
        trust_backbone()
    elif cfg.vision_backbone() and not cfg.init_from:
        trust_backbone(cfg.vision_backbone())


def get_backbone(name: str) -> Backbone:
    """A registered backbone, or (when trusted: `trust_backbone`) the `Backbone` at `package.module:attribute`."""
    if name in BACKBONES:
        return BACKBONES[name]
    if ":" not in name:
        raise ValueError(f"unknown backbone {name!r}: use one of {', '.join(sorted(BACKBONES))} or "
                         "'package.module:attribute' naming a mmcl.towers.backbones.Backbone")
    module, _, attribute = name.partition(":")
    if name not in _TRUSTED and "*" not in _TRUSTED:
        raise ConfigError(f"the model names the backbone {name!r}, code that mmcl would import from your environment "
                          f"(module {module!r}); mmcl imports a model's code only when you trust it: pass "
                          "--trust-backbone (model.trust_backbone: true in a config), as transformers' trust_remote_code")
    spec = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(spec, Backbone):
        raise ValueError(f"backbone {name!r}: {module}.{attribute} is not a mmcl.towers.backbones.Backbone")
    return spec


class BackboneConfig(PretrainedConfig):
    """The tower's config: the backbone's name and build options, and its output width."""

    model_type = MODEL_TYPE

    def __init__(self, backbone: str = "", options: dict[str, Any] | None = None, hidden_size: int | None = None,
                 **kwargs: Any) -> None:
        self.backbone = backbone
        self.options = dict(options or {})
        self.hidden_size = hidden_size if hidden_size is not None else (get_backbone(backbone).width if backbone else 0)
        super().__init__(**kwargs)


class BackboneTower(nn.Module):
    """A backbone as an mmcl tower: `forward(pixel_values=...)` -> `pooler_output` (B, width), and the
    same features as a one-token `last_hidden_state`."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = get_backbone(config.backbone).build(config.options)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        pooled = self.backbone(pixel_values)
        if pooled.dim() != 2 or pooled.shape[1] != self.config.hidden_size:
            raise ValueError(f"backbone {self.config.backbone!r} returned features of shape {tuple(pooled.shape)}; "
                             f"the contract is (batch, {self.config.hidden_size})")
        return BaseModelOutputWithPooling(last_hidden_state=pooled.unsqueeze(1), pooler_output=pooled)


def tower_from_config(config: dict[str, Any]) -> BackboneTower:
    """A tower at random init from its config dict (`model_type: mmcl_backbone`, `backbone: NAME`, ...)."""
    if not config.get("backbone"):
        raise ValueError(f"a {MODEL_TYPE} tower config needs 'backbone' (one of {', '.join(sorted(BACKBONES))} "
                         "or 'package.module:attribute')")
    return BackboneTower(BackboneConfig(**{k: v for k, v in config.items() if k != "model_type"}))


def pretrained_tower(reference: str) -> BackboneTower:
    """`backbone:NAME`: the tower with the backbone's pretrained weights."""
    name = reference.removeprefix(PREFIX)
    spec = get_backbone(name)
    if spec.load_pretrained is None:
        raise ValueError(f"backbone {name!r} has no pretrained weights; build it at random init with "
                         f"model.vision_config: {{model_type: {MODEL_TYPE}, backbone: {name}}}")
    tower = BackboneTower(BackboneConfig(backbone=name))
    spec.load_pretrained(tower.backbone)
    return tower


class NoTransformersCopy(ValueError):
    """The backbone has no `to_transformers`: nothing outside mmcl can rebuild it."""


def as_transformers(tower: BackboneTower) -> Any:
    """The transformers model that computes `tower`'s features as its `pooler_output` (for export)."""
    spec = get_backbone(tower.config.backbone)
    if spec.to_transformers is None:
        raise NoTransformersCopy(
            f"the vision tower is the backbone {tower.config.backbone!r}, whose Backbone gives no to_transformers: "
            "sentence-transformers loads towers through transformers' AutoModel, so no export loads without mmcl "
            "(load the mmcl folder with mmcl, or give the Backbone a to_transformers; hub.export=false skips export)")
    return spec.to_transformers(tower.backbone)


def image_processor(name: str, image_size: int | None) -> Any:
    """The backbone's preprocessing as a transformers image processor (PIL backend, saved with the model)."""
    from transformers import ViTImageProcessorPil

    spec = get_backbone(name)
    size = image_size or spec.image_size
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=list(spec.image_mean),
                                image_std=list(spec.image_std), do_convert_rgb=True)


BACKBONES["efficientnet-lite0"] = Backbone(
    build=lambda options: efficientnet.EfficientNetLite("efficientnet-lite0"), width=1280,
    image_mean=(127 / 255,) * 3, image_std=(128 / 255,) * 3,  # the package's (x - 127) / 128 on 0..255
    image_size=224, load_pretrained=efficientnet.load_lite0,
    to_transformers=lambda module: efficientnet.to_transformers(module.net))
