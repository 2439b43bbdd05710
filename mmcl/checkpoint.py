"""Checkpoints that survive a crash: each is written to a hidden temporary folder and renamed
into place only when complete, so the newest `step-*` folder is always a usable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from .config import Config, ConfigError
from .data import SkipCounter, Skipped

STATE_NAME = "mmcl_train_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"train.resume: {path} is not a complete mmcl checkpoint (no {STATE_NAME}); "
                          f"complete ones: {[str(p) for p in checkpoints(output_dir)] or 'none'}")
    return path


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`; an older `final` is removed only afterwards."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def gather_skipped(skipped: SkipCounter) -> SkipCounter:
    """Every process's skipped rows in one counter (call it on all processes)."""
    from accelerate.utils import gather_object

    merged = SkipCounter()
    for rows, examples in gather_object([(sorted(skipped.rows), list(skipped.examples))]):
        merged.rows.update(rows)
        merged.examples.extend(e for e in examples if len(merged.examples) < 10 and e not in merged.examples)
    return merged


def save(accelerator: Accelerator, output_dir: Path, step: int, keep_last: int, skipped: SkipCounter,
         stream: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the full training state (model, optimizer, scheduler, RNG, every process's skipped
    rows and position in a training stream, and `extra`) at `step`, atomically."""
    skipped = gather_skipped(skipped)
    folder = output_dir / "checkpoints"
    final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if stream is not None:  # every process is at its own place in the stream
        with open(tmp / f"stream_state_{accelerator.process_index}.json", "w", encoding="utf-8") as f:
            json.dump(stream.state_dict(), f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "skipped_rows": sorted(skipped.rows),
                 "skipped_examples": [s._asdict() for s in skipped.examples], **(extra or {})}
        with open(tmp / STATE_NAME, "w", encoding="utf-8") as f:
            json.dump(state, f)  # written last: its presence marks the checkpoint complete
        _replace_dir(tmp, final)
        for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, folder: Path, skipped: SkipCounter, stream: Any = None) -> dict[str, Any]:
    """Restore the training state; returns the saved state (its "step" is where to continue)."""
    accelerator.load_state(str(folder))
    if stream is not None:
        path = folder / f"stream_state_{accelerator.process_index}.json"
        if not path.is_file():
            raise ConfigError(f"train.resume: {folder} has no stream position for process "
                              f"{accelerator.process_index} (was it saved with another number of processes?)")
        with open(path, encoding="utf-8") as f:
            stream.load_state_dict(json.load(f))
    with open(folder / STATE_NAME, encoding="utf-8") as f:
        state = json.load(f)
    skipped.rows.update(state["skipped_rows"])
    skipped.examples.extend(Skipped(**s) for s in state["skipped_examples"])
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    set_aside_newer(folder, int(state["step"]), accelerator)
    return state


def set_aside_newer(folder: Path, step: int, accelerator: Accelerator) -> None:
    """Resuming from an older checkpoint abandons the newer ones of that run: rename them so that
    `latest` and `keep_last` only see the run being continued (nothing is deleted)."""
    if accelerator.is_main_process:
        for newer in checkpoints(folder.parent.parent):
            if int(STEP_DIR.match(newer.name).group(1)) > step:
                os.replace(newer, newer.with_name(f".abandoned-{newer.name}"))
    accelerator.wait_for_everyone()


def save_final(model: Any, tokenizer: Any, image_processor: Any, config: Config, final: Path,
               info: dict[str, Any] | None = None) -> None:
    """The trained model with its tokenizer, image processor and resolved config, atomically;
    `info` (e.g. the step and metric of a best model) goes to `mmcl_info.json`."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    from .card import scrub_secrets

    with open(tmp / "mmcl_training_config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(scrub_secrets(config.to_dict()), f, sort_keys=False)  # nothing secret-looking
    if info:
        with open(tmp / "mmcl_info.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    _replace_dir(tmp, final)
