"""Load any supported image–text model, with its tokenizer and image processor, as one bundle.

`load_encoder(name)` accepts an mmcl folder, or a `CLIPModel`, `SiglipModel` or
`VisionTextDualEncoderModel` folder or Hub id, and returns an `EncoderBundle`: an `Encoder`
(see `mmcl.towers.model`) plus what turns texts and images into its inputs. This is the only place that
loads a saved model for use; evaluation, `mmcl predict / embed / search` and the export probes
all take the bundle.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import (MODEL_CONFIG_NAME, check_model_reference, load_pretrained, recommended_templates,
                         trained_text_inputs)
from ..config import ConfigError
from .model import DualEncoder, DualEncoderOutput, Encoder

SUPPORTED = ("clip", "siglip", "siglip2", "vision-text-dual-encoder")


class HFEncoder(nn.Module):
    """A transformers dual encoder (CLIP, SigLIP, VisionTextDualEncoder) as an mmcl `Encoder`:
    unit-norm features, and `forward` returning a `DualEncoderOutput`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.embed_dim: int = getattr(config, "projection_dim", None) or config.vision_config.hidden_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self._tensor(out), dim=-1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._tensor(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> DualEncoderOutput:
        text = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
        image = None if pixel_values is None else self.get_image_features(pixel_values)
        return DualEncoderOutput(image, text, self.logit_scale)


@dataclass
class EncoderBundle:
    """A loaded model and what prepares its inputs."""

    encoder: Encoder  # get_text_features / get_image_features -> unit-norm (B, D)
    tokenizer: Any
    image_processor: Any
    text_padding: str = "longest"  # SigLIP was trained on max_length padding and needs it
    max_length: int = 77  # captions are truncated to this many tokens
    name: str = ""  # the folder or Hub id it was loaded from
    templates: str | None = None  # zero-shot templates its training captions call for (`templates: auto`)

    def to(self, device: torch.device | str) -> "EncoderBundle":
        self.encoder.to(device)
        return self


def load_processors(name: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The (tokenizer, image processor) saved with a model (or in a run's `processor/` folder)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    with _quiet_config_fallback(name):
        tokenizer = load_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code)
    return tokenizer, load_pretrained(AutoImageProcessor, name, "image processor", trust_remote_code)


@contextmanager
def _quiet_config_fallback(name: str | os.PathLike) -> Iterator[None]:
    """AutoTokenizer reads a folder's config.json; for mmcl's remote-code export (model_type
    mmcl_dual_encoder, known to transformers only with trust_remote_code) it falls back to a plain
    config and warns that the model types differ, which is true and harmless: the tokenizer's class
    is in tokenizer_config.json. Only for such a folder, transformers' warnings are silenced while its
    tokenizer loads."""
    from transformers.utils import logging as hf_logging

    config = Path(name) / "config.json"
    ours = config.is_file() and '"mmcl_dual_encoder"' in config.read_text(errors="replace")
    before = hf_logging.get_verbosity()
    if ours:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_hf_dual_encoder(name: str, allowed: tuple[str, ...] = SUPPORTED, trust_remote_code: bool = False) -> Any:
    """A transformers dual encoder (folder or Hub id) of one of the `allowed` model types."""
    from transformers import AutoConfig, AutoModel

    check_model_reference(name)
    config = load_pretrained(AutoConfig, name, "config", trust_remote_code)
    if config.model_type == "siglip2" and "siglip" in allowed:
        raise ConfigError(f"{name} is a SigLIP 2 NaFlex model (Siglip2Model: variable resolution with a patch "
                          "mask), which mmcl cannot train yet; the fixed-resolution SigLIP 2 checkpoints "
                          "(e.g. google/siglip2-base-patch16-224) are SiglipModel folders and work")
    if config.model_type not in allowed:
        raise ConfigError(f"{name} is a '{config.model_type}' model; expected an mmcl folder or one of: "
                          f"{', '.join(allowed)}")
    return load_pretrained(AutoModel, name, "weights", trust_remote_code)


def load_encoder(name: str, trust_remote_code: bool = False) -> EncoderBundle:
    """An mmcl folder, or a CLIP / SigLIP / VisionTextDualEncoder folder or Hub id, in eval mode."""
    check_model_reference(name)
    if (Path(name) / MODEL_CONFIG_NAME).is_file():
        tokenizer, image_processor = load_processors(name, trust_remote_code)
        max_length, padding = trained_text_inputs(name)
        model = DualEncoder.from_pretrained(name).eval()
        positions = model.config.text_config.get("max_position_embeddings")  # no longer text than the tower reads
        max_length = min(max_length, positions) if isinstance(positions, int) else max_length
        return EncoderBundle(model, tokenizer, image_processor, padding, max_length, name, recommended_templates(name))
    model = load_hf_dual_encoder(name, SUPPORTED, trust_remote_code).eval()
    tokenizer, image_processor = load_processors(name, trust_remote_code)
    siglip = model.config.model_type.startswith("siglip")
    max_length = 64 if siglip else min(77, getattr(tokenizer, "model_max_length", 77))
    return EncoderBundle(HFEncoder(model), tokenizer, image_processor, "max_length" if siglip else "longest",
                         max_length, name, recommended_templates(name))
