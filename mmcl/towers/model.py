"""The dual encoder: a Hugging Face text tower and vision tower, a linear projection each into
one embedding space, and a learned temperature.

`forward` returns L2-normalised `image_embeds` (B, D), `text_embeds` (B, D) and `logit_scale`
(the log of the inverse temperature). The contrastive losses live in `mmcl.losses`.

`Encoder` is the contract every consumer of a trained model relies on (evaluation, predict,
export probes): `DualEncoder` implements it, and so do the adapters in `mmcl.towers.inference` that wrap
transformers' CLIPModel / SiglipModel / VisionTextDualEncoderModel. `DualEncoder.from_hf` and
`DualEncoder.to_hf` are the one place that maps weights between mmcl and those CLIP formats.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ..artifacts import MODEL_CONFIG_NAME, WEIGHTS_NAME
from ..secrets import scrub_secrets
from .backbones import MODEL_TYPE, BackboneTower, tower_from_config
from .heads import TRAINING_HEADS, predictor_head, prototype_layers, ssl_head


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
    init_logit_bias: float | None = None  # a learned logit bias (SigLIP's loss needs one), else none
    identity_projection: bool = False  # SigLIP's towers project themselves: no projection layers
    image_ssl_dim: int | None = None  # SLIP / BYOL: an image–image MLP head of this output width, else none
    predictor_hidden: int | None = None  # BYOL: a predictor MLP of this hidden width (run by the objective)
    swav_prototypes: int | None = None  # SwAV: this many prototypes per space (run by the objective)
    extra: dict[str, Any] = field(default_factory=dict)  # free metadata (training config, ...)


@dataclass
class DualEncoderOutput:
    image_embeds: torch.Tensor | None  # (B, D), unit norm
    text_embeds: torch.Tensor | None  # (B, D), unit norm
    logit_scale: torch.Tensor  # (1,) (0-d from a transformers CLIPModel), ln(1 / temperature)
    logit_bias: torch.Tensor | None = None  # (1,), added to every logit (SigLIP); None without one
    view_embeds: torch.Tensor | None = None  # (2B, D_ssl), unit norm: the image–image head's output (SLIP)


@runtime_checkable
class Encoder(Protocol):
    """What evaluation and inference need of an image–text model: unit-norm features, the
    temperature and the embedding width. Calling it (`model(pixel_values=...)`,
    `model(input_ids=..., attention_mask=...)`) returns a `DualEncoderOutput`, which is how a
    model prepared by Accelerate (DDP / FSDP wrappers) must be run."""

    embed_dim: int
    logit_scale: torch.Tensor

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ...

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None) -> DualEncoderOutput:
        ...


def tower_width(tower: nn.Module) -> int:
    """The width of a tower's pooled output: from its config, or (timm through transformers'
    TimmWrapperModel, whose config does not say) from the timm model."""
    timm_model = getattr(tower, "timm_model", None)
    if timm_model is not None:
        return timm_model.num_features
    return _hidden_size(tower.config)


def _hidden_size(config: PretrainedConfig) -> int:
    # projection_size: SigLIP's text head output, the width of its pooler_output
    for name in ("projection_size", "projection_dim_in", "hidden_size", "d_model", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    sizes = getattr(config, "hidden_sizes", None)  # ConvNeXt, ResNet: the last stage's width
    if sizes:
        return sizes[-1]
    raise ValueError(f"cannot tell the output width of a {type(config).__name__}; set its hidden_size")


# Towers that AutoModel does not build from their own config type
_TOWER_CLASSES = {"siglip_text_model": "SiglipTextModel", "siglip_vision_model": "SiglipVisionModel"}


def tower_from_dict(config: dict[str, Any]) -> PreTrainedModel | BackboneTower:
    """A tower at random init from a config dict with `model_type` (offline)."""
    if config.get("model_type") == MODEL_TYPE:  # a backbone through mmcl's adapter contract
        return tower_from_config(config)
    config = dict(config)
    model_type = config.pop("model_type")
    tower_config = AutoConfig.for_model(model_type, **config)
    if model_type in _TOWER_CLASSES:
        import transformers

        return getattr(transformers, _TOWER_CLASSES[model_type])(tower_config)
    return AutoModel.from_config(tower_config)


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


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it is a view into a larger buffer (a gathered FSDP state dict): safetensors
    refuses to save part of a storage."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.detach().clone()


def load_weights(model: nn.Module, file: Path) -> None:
    """`save_model`'s file into `model`; a 0-d logit_scale / logit_bias (saved before they became
    1-D) is reshaped."""
    with safe_open(str(file), "pt") as f:
        legacy = [k for k in ("logit_scale", "logit_bias") if k in f.keys() and f.get_slice(k).get_shape() == []]
    if not legacy:
        load_model(model, str(file))
        return
    state = load_file(str(file))
    for key in legacy:
        state[key] = state[key].reshape(1)
    model.load_state_dict(state)


class DualEncoder(nn.Module):
    """Two towers + projections + temperature; see the module docstring for the contract."""

    def __init__(self, config: DualEncoderConfig, text_model: PreTrainedModel | None = None,
                 vision_model: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.text_model = text_model or tower_from_dict(config.text_config)
        self.vision_model = vision_model or tower_from_dict(config.vision_config)
        # A pooler head that the pooling choice never calls would get no gradient, which DDP
        # rejects; drop it (BERT, ViT and most towers skip a pooler that is None).
        for tower, how in ((self.text_model, config.text_pooling), (self.vision_model, config.vision_pooling)):
            if how != "pooler" and isinstance(getattr(tower, "pooler", None), nn.Module):
                if any(True for _ in tower.pooler.parameters()):
                    tower.pooler = None
        text_width, vision_width = tower_width(self.text_model), tower_width(self.vision_model)
        if config.identity_projection:  # the towers' pooler_output is already the shared space
            if not text_width == vision_width == config.projection_dim:
                raise ValueError(f"identity projections need equal widths, got text {text_width}, vision "
                                 f"{vision_width}, projection_dim {config.projection_dim}")
            self.text_projection, self.visual_projection = nn.Identity(), nn.Identity()
        else:  # no bias, as in CLIP: keeps export to CLIPModel / VisionTextDualEncoderModel exact
            self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
            self.visual_projection = nn.Linear(vision_width, config.projection_dim, bias=False)
        # one-element 1-D tensors, not 0-d: FSDP2 cannot shard a 0-d parameter (as SiglipModel's)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / config.init_temperature)]))
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(torch.tensor([config.init_logit_bias]))
        self.image_ssl_head = None if config.image_ssl_dim is None else ssl_head(vision_width, config.image_ssl_dim)
        self.predictor = None if config.predictor_hidden is None or config.image_ssl_dim is None else \
            predictor_head(config.image_ssl_dim, config.predictor_hidden)
        self.prototypes = None if config.swav_prototypes is None else \
            prototype_layers(config.swav_prototypes, self.embed_dim, config.image_ssl_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.projection_dim

    @property
    def _no_split_modules(self) -> list[str]:
        """The towers' block classes that are in this model: FSDP's transformer-block wrapping
        (Accelerate's TRANSFORMER_BASED_WRAP) shards each of them as its own unit."""
        named = {n for tower in (self.text_model, self.vision_model) for n in getattr(tower, "_no_split_modules", None) or []}
        present = {type(m).__name__ for m in self.modules()}
        return sorted(named & present)

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
                pixel_values: torch.Tensor | None = None, view_pixel_values: torch.Tensor | None = None,
                **text_kwargs: Any) -> DualEncoderOutput:
        """`view_pixel_values` (training with SLIP's term): augmented views through the vision tower
        and the image–image head, returned as `view_embeds`."""
        text_embeds = image_embeds = views = None
        if input_ids is not None:
            text_embeds = self.get_text_features(input_ids, attention_mask, **text_kwargs)
        if pixel_values is not None:
            image_embeds = self.get_image_features(pixel_values)
        if view_pixel_values is not None:
            if self.image_ssl_head is None:
                raise ValueError("view_pixel_values needs an image–image head (DualEncoderConfig.image_ssl_dim)")
            pooled = pool(self.vision_model(pixel_values=view_pixel_values), None, self.config.vision_pooling)
            views = F.normalize(self.image_ssl_head(pooled), dim=-1)
        return DualEncoderOutput(image_embeds, text_embeds, self.logit_scale, self.logit_bias, views)

    def add_image_ssl_head(self, dim: int) -> None:
        """Give a model an image–image head (to train it with SLIP's term)."""
        if self.image_ssl_head is None:
            self.config.image_ssl_dim = dim
            width = tower_width(self.vision_model)
            self.image_ssl_head = ssl_head(width, dim).to(self.logit_scale.device)

    def add_predictor(self, hidden: int) -> None:
        """Give a model with an image–image head BYOL's predictor (to train it with BYOL's term)."""
        if self.predictor is None and self.image_ssl_head is not None:
            self.config.predictor_hidden = hidden
            self.predictor = predictor_head(self.config.image_ssl_dim, hidden).to(self.logit_scale.device)

    def add_prototypes(self, count: int) -> None:
        """Give a model SwAV's prototypes (to train it with SwAV's term; after any image–image head)."""
        if self.prototypes is None:
            self.config.swav_prototypes = count
            self.prototypes = prototype_layers(count, self.embed_dim, self.config.image_ssl_dim).to(
                self.logit_scale.device)

    def training_head(self, name: str) -> nn.Module:
        """A head the objective runs itself ("predictor": BYOL's, "prototypes": SwAV's), unwrapped from
        any DDP / FSDP wrapper, or an error naming the config field that adds it."""
        head = getattr(self, name, None)
        if head is None:
            raise ValueError(f"this loss needs the model's {name} (DualEncoderConfig.{TRAINING_HEADS[name]})")
        return head

    def add_logit_bias(self, init: float) -> None:
        """Give a model trained without one a learned logit bias (to fine-tune it with SigLIP's loss)."""
        if self.logit_bias is None:
            self.config.init_logit_bias = init
            self.logit_bias = nn.Parameter(torch.tensor([init], device=self.logit_scale.device))

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for tower in (self.text_model, self.vision_model):
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()  # a locked tower keeps dropout off and BatchNorm statistics fixed
                continue
            for module in tower.modules():  # a partly unlocked one: its locked BatchNorms stay as they were
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and \
                        not module.weight.requires_grad:
                    module.eval()
        return self

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature >= 1/max_logit_scale (CLIP clamps at 100); call after each step."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Weights as one safetensors file plus `mmcl_config.json`; nothing is pickled. `state_dict`:
        the full weights of a model whose own parameters are shards (FSDP, DeepSpeed ZeRO-3)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        model = self
        if state_dict is not None:  # the same architecture, its weights from `state_dict` (no copy)
            with torch.device("meta"):
                model = type(self)(self.config)
            model.load_state_dict({k: _own_storage(v) for k, v in state_dict.items()}, assign=True)
        save_model(model, str(path / WEIGHTS_NAME))
        with open(path / MODEL_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(scrub_secrets(asdict(self.config)), f, indent=2, default=str)  # nothing secret-looking

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DualEncoder":
        path = Path(directory)
        if not (path / MODEL_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {MODEL_CONFIG_NAME}: not an mmcl model folder")
        with open(path / MODEL_CONFIG_NAME, encoding="utf-8") as f:
            model = cls(DualEncoderConfig(**json.load(f)))
        load_weights(model, path / WEIGHTS_NAME)
        return model.eval()

    @classmethod
    def from_hf(cls, source: PreTrainedModel, init_temperature: float = 0.07,
                max_logit_scale: float = 100.0) -> "DualEncoder":
        """A dual encoder holding the weights of a `CLIPModel`, `SiglipModel` or `VisionTextDualEncoderModel`.

        All use their towers' `pooler_output` (CLIP: the EOS token / the post-normed CLS; SigLIP: the
        last token through its head / the attention-pooling head), so the result pools with
        "pooler" on both sides. CLIP and VTDE projections are copied; SigLIP has none (its heads
        project), so it gets identity projections, and its logit bias. The temperature is the source's.
        """
        text, vision = source.text_model, source.vision_model
        siglip = source.config.model_type == "siglip"  # towers with their own heads, and a logit bias
        bias = source.logit_bias.item() if siglip else None
        dim = _hidden_size(vision.config) if siglip else source.text_projection.out_features
        dual = cls(DualEncoderConfig(
            text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
            text_pooling="pooler", vision_pooling="pooler", projection_dim=dim, init_temperature=init_temperature,
            max_logit_scale=max_logit_scale, init_logit_bias=bias, identity_projection=siglip), text, vision)
        if not siglip:
            dual.text_projection.load_state_dict(source.text_projection.state_dict())
            dual.visual_projection.load_state_dict(source.visual_projection.state_dict())
        dual.logit_scale.data.copy_(source.logit_scale.data.reshape(1))  # CLIP's is 0-d
        return dual

    def hf_class(self) -> tuple[str | None, str | None]:
        """(the transformers class that can hold this model, or None; why not, if None)."""
        from transformers import CLIPTextModel, CLIPVisionModel, SiglipTextModel, SiglipVisionModel

        cfg = self.config
        if isinstance(self.vision_model, BackboneTower):
            return None, (f"the vision tower is the backbone {self.vision_model.config.backbone!r} (mmcl's adapter "
                          "contract), not a transformers model: the sentence-transformers route carries the "
                          "transformers copy its Backbone gives (to_transformers), if any")
        if cfg.text_pooling != "pooler" or cfg.vision_pooling != "pooler":
            return None, (f"pooling text={cfg.text_pooling!r}, vision={cfg.vision_pooling!r} has no native "
                          "transformers class: CLIPModel and VisionTextDualEncoderModel project each tower's "
                          "pooler_output, so only pooling 'pooler' on both towers can be expressed; use the "
                          "sentence-transformers route")
        if isinstance(self.text_model, CLIPTextModel) and isinstance(self.vision_model, CLIPVisionModel):
            return "CLIPModel", None
        siglip_towers = isinstance(self.text_model, SiglipTextModel) and isinstance(self.vision_model, SiglipVisionModel)
        if siglip_towers and cfg.identity_projection and self.logit_bias is not None:
            return "SiglipModel", None
        if cfg.identity_projection:
            return None, "identity projections without SigLIP towers and bias have no native transformers class"
        return "VisionTextDualEncoderModel", None

    def to_hf(self, name: str) -> PreTrainedModel:
        """A `CLIPModel` / `VisionTextDualEncoderModel` (see `hf_class`) with these weights, in eval mode."""
        from transformers import CLIPConfig, CLIPModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

        text, vision = self.text_model, self.vision_model
        dim, scale = self.config.projection_dim, self.logit_scale.item()
        if name == "SiglipModel":
            return self._to_siglip()
        if name == "CLIPModel":
            native = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                          projection_dim=dim, logit_scale_init_value=scale))
            native.text_model.load_state_dict(text.state_dict())
            native.vision_model.load_state_dict(vision.state_dict())
        else:
            config = VisionTextDualEncoderConfig.from_vision_text_configs(
                vision.config, text.config, projection_dim=dim, logit_scale_init_value=scale)
            native = VisionTextDualEncoderModel(config, vision_model=vision, text_model=text)
        native.text_projection.load_state_dict(self.text_projection.state_dict())
        native.visual_projection.load_state_dict(self.visual_projection.state_dict())
        native.logit_scale.data.copy_(self.logit_scale.data.reshape(()))  # CLIP's is 0-d
        return native.eval()

    def _to_siglip(self) -> PreTrainedModel:
        from transformers import SiglipConfig, SiglipModel

        native = SiglipModel(SiglipConfig(text_config=self.text_model.config.to_dict(),
                                          vision_config=self.vision_model.config.to_dict()))
        native.text_model.load_state_dict(self.text_model.state_dict())
        native.vision_model.load_state_dict(self.vision_model.state_dict())
        native.logit_scale.data.copy_(self.logit_scale.data.reshape(1))
        native.logit_bias.data.copy_(self.logit_bias.data.reshape(1))
        return native.eval()
