"""LoRA (Hu et al. 2021, "Low-rank adaptation of large language models") on either tower, through
peft: `model.lora: {text: {r, alpha, dropout, target_modules}, vision: {...}}`.

peft injects its adapter layers into the tower in place, so the dual encoder keeps its structure
(`text_model` is still the transformers tower) and its forward is unchanged; `mmcl.towers.build` then
freezes the tower's own weights. A fresh adapter's up-projection is zero, so before the first step
the model computes exactly what the base model computes. The saved model (final, best) has the
updates merged into the base weights (`merged_weights`): a plain model that loads without peft.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraSpec, ModelConfig

ADAPTER = "default"


def require_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ConfigError("model.lora needs peft, which is not installed: pip install 'mmcl[peft]'") from error
    return peft


def is_adapter_weight(name: str) -> bool:
    """A parameter of a LoRA adapter (peft names them lora_A, lora_B, lora_embedding_*, ...)."""
    return ".lora_" in f".{name}"


def default_targets(tower: nn.Module) -> list[str] | str:
    """peft's own choice for the tower's model type (BERT: query, value), else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return DEFAULTS.get(getattr(getattr(tower, "config", None), "model_type", None)) or "all-linear"


def add_adapters(tower: nn.Module, spec: LoraSpec, key: str) -> None:
    """Inject LoRA adapters into `tower` in place (peft's `inject_adapter_in_model`)."""
    peft = require_peft()
    targets = spec.target_modules or default_targets(tower)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    try:
        peft.inject_adapter_in_model(config, tower, adapter_name=ADAPTER)
    except ValueError as error:  # peft's "Target modules {...} not found in the base model"
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in tower.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.lora.{key}.target_modules={targets!r}: {str(error).splitlines()[0]} The "
                          f"{type(tower).__name__}'s linear layers are named: {', '.join(linear)}") from error


def apply_lora(model: nn.Module, cfg: ModelConfig) -> None:
    """`model.lora`: adapters on the towers it names."""
    for key, spec in cfg.lora.items():
        add_adapters(getattr(model, f"{key}_model"), spec, key)


def adapter_layers(model: nn.Module) -> dict[str, Any]:
    """The model's LoRA-wrapped layers by module name ({} when it has none, or peft is absent)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every adapter's update merged into the weight it adapts (peft's
    `get_delta_weight`) and the plain layers' names: what the model would be without peft. None
    when the model has no adapters. The model itself is not changed, so training can go on."""
    layers = adapter_layers(model)
    if not layers:
        return None
    state = model.state_dict()
    for name, layer in layers.items():
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.startswith("base_layer."):
                state[prefix + rest[len("base_layer."):]] = state.pop(key)
            elif is_adapter_weight(rest):
                del state[key]
        with torch.no_grad():
            delta = layer.get_delta_weight(ADAPTER)
        state[f"{prefix}weight"] = state[f"{prefix}weight"] + delta.to(state[f"{prefix}weight"].dtype)
    return state


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; whole ones where DeepSpeed ZeRO-3 holds a partition."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)
