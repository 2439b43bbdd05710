"""Load any supported image–text model for inference behind one small interface.

`load_encoder(name)` accepts an mmcl folder, or a `CLIPModel`, `SiglipModel` or
`VisionTextDualEncoderModel` folder or Hub id, and returns an `Encoder` whose
`get_text_features` / `get_image_features` give unit-norm embeddings, plus the tokenizer and the
image processor saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import CONFIG_NAME, DualEncoder

SUPPORTED = ("clip", "siglip", "siglip2", "vision-text-dual-encoder")


class HFEncoder(nn.Module):
    """Adapts a transformers dual encoder to mmcl's encoder interface (unit-norm features)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self._tensor(out), dim=-1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._tensor(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)


@dataclass
class Loaded:
    encoder: nn.Module  # get_text_features / get_image_features -> unit-norm (B, D)
    tokenizer: Any
    image_processor: Any
    text_padding: str = "longest"  # SigLIP was trained on max_length padding and needs it
    max_length: int = 77  # captions are truncated to this many tokens


def load_encoder(name: str, trust_remote_code: bool = False) -> Loaded:
    """An mmcl folder, or a CLIP / SigLIP / VisionTextDualEncoder folder or Hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    if (Path(name) / CONFIG_NAME).is_file():
        return Loaded(DualEncoder.from_pretrained(name).eval(), tokenizer, image_processor,
                      max_length=_trained_max_length(Path(name)))
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{name} is a '{config.model_type}' model; mmcl evaluates mmcl folders and "
                         f"{', '.join(SUPPORTED)} models")
    model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code).eval()
    siglip = config.model_type.startswith("siglip")
    max_length = 64 if siglip else min(77, getattr(tokenizer, "model_max_length", 77))
    return Loaded(HFEncoder(model), tokenizer, image_processor, "max_length" if siglip else "longest", max_length)


def _trained_max_length(folder: Path) -> int:
    """The caption length the model was trained with (from its saved training config)."""
    import yaml

    path = folder / "mmcl_training_config.yaml"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return int(yaml.safe_load(f)["model"]["max_text_length"])
    return 77
