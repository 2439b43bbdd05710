"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weight-space
mix (1 - alpha) * pretrained + alpha * fine-tuned of two models of one architecture. alpha 0 is the
pretrained model, 1 the fine-tuned one; in between often keeps most of the pretrained model's
zero-shot ability and most of the fine-tuned model's gain. `mmcl wise-ft PRETRAINED FINETUNED
--alpha 0.5 OUT` writes the mix as an mmcl model folder.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artifacts import INFO_NAME, MODEL_CONFIG_NAME, WEIGHTS_NAME, atomic_dir, write_json
from .config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "merges.txt", "spiece.model")


def describe(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def mix_weights(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * pretrained + alpha * fine-tuned, tensor by tensor (`torch.lerp`: alpha 0 and 1
    give the inputs bit for bit). Non-float tensors (ids, counters) must be equal and are kept."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha {alpha}: WiSE-FT mixes with 0 <= alpha <= 1")
    mixed = {}
    for name in sorted(pretrained.keys() | finetuned.keys()):
        a, b = pretrained.get(name), finetuned.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            raise ConfigError(f"the two models differ at tensor {name}: pretrained {describe(a)}, fine-tuned "
                              f"{describe(b)}; WiSE-FT needs one architecture")
        if a.is_floating_point():
            mixed[name] = torch.lerp(a, b, alpha)
        elif torch.equal(a, b):
            mixed[name] = b
        else:
            raise ConfigError(f"the two models differ in the non-float tensor {name}, which cannot be mixed")
    return mixed


def check_same_tokenizer(pretrained: Path, finetuned: Path) -> None:
    """One vocabulary: the same embedding shapes with two tokenizers would mix unrelated rows."""
    for name in TOKENIZER_FILES:
        a, b = pretrained / name, finetuned / name
        if a.is_file() != b.is_file() or (a.is_file() and not filecmp.cmp(a, b, shallow=False)):
            raise ConfigError(f"{a} and {b} differ: the two models have other tokenizers, so their token "
                              "embeddings cannot be mixed (fine-tune with the pretrained model's tokenizer)")


def wise_ft(pretrained: str | Path, finetuned: str | Path, alpha: float, out: str | Path) -> Path:
    """Write the mix of two mmcl model folders to `out` (the fine-tuned folder's config, tokenizer
    and image processor, the mixed weights, and `mmcl_info.json` saying what was mixed)."""
    pretrained, finetuned, out = Path(pretrained), Path(finetuned), Path(out)
    for folder in (pretrained, finetuned):
        if not (folder / MODEL_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {MODEL_CONFIG_NAME}: WiSE-FT mixes two mmcl model folders")
    check_same_tokenizer(pretrained, finetuned)
    mixed = mix_weights(load_file(pretrained / WEIGHTS_NAME), load_file(finetuned / WEIGHTS_NAME), alpha)
    with atomic_dir(out) as tmp:
        for path in finetuned.iterdir():
            if path.is_file() and path.name not in (WEIGHTS_NAME, INFO_NAME):
                shutil.copy2(path, tmp / path.name)
        save_file(mixed, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / INFO_NAME, {"wise_ft": {"pretrained": str(pretrained), "finetuned": str(finetuned),
                                                  "alpha": alpha}})
    return out
