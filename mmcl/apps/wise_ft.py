"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weight-space
mix (1 - alpha) * pretrained + alpha * fine-tuned of two models of one architecture. alpha 0 is the
pretrained model, 1 the fine-tuned one; in between often keeps most of the pretrained model's
zero-shot ability and most of the fine-tuned model's gain. `mmcl wise-ft PRETRAINED FINETUNED
OUT --alpha 0.5` writes the mix as an mmcl model folder; `--alpha 0,0.25,0.5,0.75,1 --eval CONFIG`
evaluates each mix on the config's evaluation sets instead (`sweep`) and draws the trade-off.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import (INFO_NAME, MARKER_NAME, MODEL_CONFIG_NAME, WEIGHTS_NAME, atomic_dir, check_output_folder,
                         mark_folder, write_json)
from ..secrets import scrub_config_files
from ..config import Config, ConfigError

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
    """One vocabulary (token -> id): the same embedding shapes with two vocabularies would mix
    unrelated rows. Settings that do not number tokens (truncation length, padding) may differ."""
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(str(folder)).get_vocab() for folder in (pretrained, finetuned))
    differing = sorted(token for token in a.keys() | b.keys() if a.get(token) != b.get(token))
    if differing:
        token = differing[0]
        raise ConfigError(f"{pretrained} and {finetuned} have other tokenizers ({len(differing)} tokens differ, e.g. "
                          f"{token!r}: id {a.get(token)} vs {b.get(token)}), so their token embeddings cannot be mixed "
                          "(fine-tune with the pretrained model's tokenizer)")


def check_inputs(pretrained: Path, finetuned: Path) -> None:
    for folder in (pretrained, finetuned):
        if not (folder / MODEL_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {MODEL_CONFIG_NAME}: WiSE-FT mixes two mmcl model folders")
    check_same_tokenizer(pretrained, finetuned)


def parse_alphas(text: str) -> list[float]:
    """"0.5" or "0,0.25,0.5,0.75,1" -> the alphas, each checked."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"--alpha {text}: give a number or a comma-separated list, e.g. 0,0.25,0.5,0.75,1") from error
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if not alphas or bad:
        raise ConfigError(f"--alpha {text}: WiSE-FT mixes with 0 <= alpha <= 1")
    return alphas


def axes(config: Config, target: str | None, retention: str | None, sets: list[str]) -> tuple[str, str]:
    """The trade-off's two metrics: the target task's (default `eval.best_metric`) and the one
    that measures what the model keeps (default the first of `eval.retention`)."""
    target = target or config.eval.best_metric
    retention = retention or (config.eval.retention or [None])[0]
    for flag, key, name in (("--target", "eval.best_metric", target), ("--retention", "eval.retention", retention)):
        if not name or name.split("/")[0] not in sets:
            raise ConfigError(f"{flag} {name or '(unset)'}: give <set>/<metric> with <set> one of the config's "
                              f"evaluations ({', '.join(sets) or 'none'}), here or as {key} in the config")
    return target, retention


def sweep(pretrained: str | Path, finetuned: str | Path, alphas: list[float], out: str | Path, config: Config,
          target: str | None = None, retention: str | None = None) -> list[dict[str, Any]]:
    """Evaluate the mix at each alpha (in memory) on `config`'s evaluation sets (`data.validation`
    as "val", and `eval.sets`); write OUT/wise_ft_sweep.json and the trade-off curve
    OUT/wise_ft_curve.png (retention across, the target metric up)."""
    from accelerate import Accelerator

    from ..evaluation.evaluators import eval_specs, load_eval_datasets, run_eval, scalars
    from ..evaluation.plots import pyplot, save_tradeoff_curve
    from ..towers.inference import load_encoder

    pretrained, finetuned, out = Path(pretrained), Path(finetuned), Path(out)
    check_inputs(pretrained, finetuned)
    check_output_folder(out)  # the sweep adds its two files to a new, empty or mmcl folder
    specs = eval_specs(config.data, config.eval)
    target, retention = axes(config, target, retention, list(specs))
    pyplot()  # matplotlib is there, before the evaluations run
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    data = load_eval_datasets(specs, config.data, accelerator)
    bundle = load_encoder(str(finetuned)).to(accelerator.device)
    a, b = load_file(pretrained / WEIGHTS_NAME), load_file(finetuned / WEIGHTS_NAME)
    shapes = {k: v.shape for k, v in bundle.encoder.state_dict().items()}  # an older folder's 0-d logit_scale
    rows = []
    for alpha in alphas:
        bundle.encoder.load_state_dict({k: v.reshape(shapes[k]) for k, v in mix_weights(a, b, alpha).items()})
        metrics: dict[str, float] = {}
        for name, (spec, ds) in data.items():
            metrics.update(scalars(name, run_eval(bundle, ds, spec, accelerator, config.eval)))
        missing = [m for m in (target, retention) if m not in metrics]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: not among the measured metrics {', '.join(sorted(metrics))}")
        row: dict[str, Any] = {"alpha": alpha, **metrics}
        print(f"alpha {alpha:g}: {target} {row[target]:.4f}, {retention} {row[retention]:.4f}")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    mark_folder(out, "wise-ft sweep")
    write_json(out / "wise_ft_sweep.json", {"pretrained": str(pretrained), "finetuned": str(finetuned),
                                            "target": target, "retention": retention, "rows": rows})
    save_tradeoff_curve(rows, retention, target, out / "wise_ft_curve.png", f"WiSE-FT: {finetuned}")
    return rows


def wise_ft(pretrained: str | Path, finetuned: str | Path, alpha: float, out: str | Path,
            overwrite: bool = False) -> Path:
    """Write the mix of two mmcl model folders to `out` (the fine-tuned folder's config, tokenizer
    and image processor, the mixed weights, and `mmcl_info.json` saying what was mixed). `out` is
    new, empty, or a folder mmcl wrote (replaced); `overwrite`: any folder."""
    pretrained, finetuned, out = Path(pretrained), Path(finetuned), Path(out)
    check_inputs(pretrained, finetuned)
    mixed = mix_weights(load_file(pretrained / WEIGHTS_NAME), load_file(finetuned / WEIGHTS_NAME), alpha)
    with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
        for path in finetuned.iterdir():  # regular files only: a link is not followed
            if path.is_file() and not path.is_symlink() and path.name not in (WEIGHTS_NAME, INFO_NAME, MARKER_NAME):
                shutil.copy2(path, tmp / path.name)
        save_file(mixed, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / INFO_NAME, {"wise_ft": {"pretrained": str(pretrained), "finetuned": str(finetuned),
                                                  "alpha": alpha}})
        scrub_config_files(tmp)
    return out
