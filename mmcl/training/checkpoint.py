"""Checkpoints that survive a crash: each is written to a hidden temporary folder and renamed
into place only when complete, so the newest `step-*` folder is always a usable one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open

from ..artifacts import (CHECKPOINTS_DIR, INFO_NAME, STATE_NAME, ZERO_SHOT_NAME, atomic_dir, explain_write_errors,
                         folder_bytes, replace_dir, save_training_config, staging_dir, write_json)
from ..secrets import scrub_config_files
from ..config import ConfigError
from ..data.pairs import SkipCounter, Skipped
from .state import TrainingState

STEP_DIR = re.compile(r"^step-(\d+)$")
EARLIER_SCRUB = re.compile(r"token(?!i[sz])", re.IGNORECASE)
# Settings a resume may change: where and how often to log, evaluate, checkpoint and publish; how
# long to train (with a constant schedule: a cosine one is drawn over train.max_steps); and the
# options that take the same steps (tests/test_train.py SPEED_OPTIONS).
# Any other change (model, loss, data, optimizer, batch) would make another run: it is refused.
RESUMABLE_CHANGES = ("train.output_dir", "train.resume", "train.overwrite_output_dir", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "train.checkpoint_every_minutes", "train.keep_last",
                     "train.report_to", "train.progress_bar",
                     "train.collective_timeout_s", "train.max_bad_steps", "train.max_steps", "train.optim",
                     "model.attn_implementation", "model.text_activation_checkpointing",
                     "model.vision_activation_checkpointing", "model.activation_checkpointing_policy",
                     "data.validation", "data.max_validation_samples", "data.num_workers", "data.cache_dir",
                     "eval.", "hub.")


LATER_KEYS = {"data.validation_share": 0.0}  # keys added since mmcl 0.2, as a run from before them computed


def held_out_share(config: dict[str, Any]) -> float:
    """The share of the training rows a run (flat config) held out as 'val': none when it named one."""
    named = config.get("data.validation") or config.get("data.streaming")
    return 0.0 if named else float(config.get("data.validation_share") or 0.0)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = output_dir / CHECKPOINTS_DIR
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


def check_config(saved: dict[str, Any] | None, now: dict[str, Any], folder: Path) -> None:
    """Refuse a resume whose settings (flat `section.key` dicts) differ from the checkpoint's in a
    way that changes the result, listing every such key; see RESUMABLE_CHANGES."""
    if saved is None:  # a checkpoint from before configs were kept in them
        return
    from ..config import Config
    from .tracking import flatten

    defaults = flatten(Config().to_dict())  # a key added since the checkpoint was written: it had the default,
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **LATER_KEYS, **saved}  # or what it did then
    # before mmcl 0.2 the config kept in checkpoints lost every key with "token" in its last part
    # (pad_token_id, eos_token_id: taken for credentials); such a key missing is no change
    now = {k: v for k, v in now.items() if k in saved or not EARLIER_SCRUB.search(k.rpartition(".")[2])}
    cosine = saved.get("train.lr_scheduler") == "cosine"
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key)
                     and (not key.startswith(RESUMABLE_CHANGES) or (key == "train.max_steps" and cosine)))
    if held_out_share(saved) == held_out_share(now):  # the share only matters when it is held out
        changed = [key for key in changed if key != "data.validation_share"]
    elif "data.validation_share" not in changed:  # data.validation named or dropped: other rows train
        changed.append("data.validation_share")
    if changed:
        raise ConfigError(f"train.resume: {folder} was saved with other settings, and these change what the run "
                          f"computes: {'; '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in changed)}. "
                          "Resume with the saved values, or start a new run in another train.output_dir "
                          "(logging, evaluation, checkpoint and publishing settings may change, and train.max_steps "
                          "with a constant schedule)")


def gather_skipped(skipped: SkipCounter) -> SkipCounter:
    """Every process's skipped rows in one counter (call it on all processes)."""
    merged = SkipCounter()
    for rows, examples in gather_object([(sorted(skipped.rows), list(skipped.examples))]):
        merged.rows.update(rows)
        merged.examples.extend(e for e in examples if len(merged.examples) < 10 and e not in merged.examples)
    return merged


def save(accelerator: Accelerator, training: TrainingState, output_dir: Path, step: int, keep_last: int,
         skipped: SkipCounter, stream: Any = None, extra: dict[str, Any] | None = None,
         size_hint: Callable[[], int] = lambda: 0) -> Path:
    """Write the training state (`training`: model, optimizer, scheduler, RNG; every process's skipped
    rows and position in a training stream, and `extra`) at `step`, atomically. A full disk or an
    unwritable folder raises `SaveError`, naming the bytes needed (the last checkpoint's size, else
    `size_hint()`), and leaves the earlier checkpoints as they were."""
    skipped = gather_skipped(skipped)
    final = output_dir / CHECKPOINTS_DIR / f"step-{step:08d}"
    tmp = staging_dir(final)  # written by every process, renamed into place by the main one
    previous = (checkpoints(output_dir) or [None])[-1]
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with explain_write_errors(final, lambda: folder_bytes(previous) if previous else size_hint(), previous):
            if accelerator.is_main_process:
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            training.save(tmp, accelerator)
            if stream is not None:  # every process is at its own place in the stream
                with open(tmp / f"stream_state_{accelerator.process_index}.json", "w", encoding="utf-8") as f:
                    json.dump(stream.state_dict(), f)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"step": step, "skipped_rows": sorted(skipped.rows),
                         "skipped_examples": [s._asdict() for s in skipped.examples], **(extra or {})}
                with open(tmp / STATE_NAME, "w", encoding="utf-8") as f:
                    json.dump(state, f)  # written last: its presence marks the checkpoint complete
                replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing half-written; its space is given back
        raise
    if accelerator.is_main_process:
        for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def frozen_fingerprint(model: torch.nn.Module) -> str | None:
    """A SHA-256 of the frozen parameters (names and bytes); None when every parameter trains."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    digest = hashlib.sha256()
    for name, param in frozen:
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_frozen(folder: Path, model: torch.nn.Module, saved: str | None, now: str) -> None:
    """Before a resume that rebuilt the frozen weights: they are those the checkpoint trained with,
    and the checkpoint has every weight that trains."""
    if saved is not None and saved != now:
        raise ConfigError(f"train.resume: the frozen weights differ from those {folder} was trained with (a "
                          "pretrained tower or model.init_from folder changed since, or a torch / transformers upgrade "
                          "initialises a random-init frozen tower otherwise): put them back, or start a new run in "
                          "another train.output_dir")
    path = folder / "model.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in keys]
        if missing:
            raise ConfigError(f"train.resume: {path} lacks {len(missing)} weights that train, e.g. {missing[0]} (was "
                              "it saved with other model.lora or lock settings?)")


def load(accelerator: Accelerator, training: TrainingState, folder: Path, skipped: SkipCounter,
         stream: Any = None) -> dict[str, Any]:
    """Restore the training state; returns the saved state (its "step" is where to continue). A file
    that is not what mmcl wrote there (damaged, replaced) stops the resume with one line naming the
    folder; nothing in it is unpickled."""
    from safetensors import SafetensorError

    earlier = [p for p in checkpoints(folder.parent.parent) if p.name < folder.name]
    instead = (f"resume from the one before it with --train.resume={earlier[-1]}" if earlier else
               "start a new run (--train.overwrite_output_dir=true)")
    if not any((folder / name).is_file() for name in ("optimizer.safetensors", "optimizer.bin")):
        raise ConfigError(f"train.resume: {folder} is incomplete (it has no optimizer state); {instead}")
    try:
        training.load(folder, accelerator)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, OSError, SafetensorError, RuntimeError) as err:
        if isinstance(err, torch.distributed.DistError):
            raise
        raise ConfigError(f"train.resume: {folder} cannot be restored ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:160]}); {instead}") from err
    if stream is not None:
        path = folder / f"stream_state_{accelerator.process_index}.json"
        if not path.is_file():
            raise ConfigError(f"train.resume: {folder} has no stream position for process "
                              f"{accelerator.process_index} (was it saved with another number of processes?)")
        with open(path, encoding="utf-8") as f:
            stream.load_state_dict(json.load(f))
    state = read_state(folder)
    skipped.rows.update(state["skipped_rows"])
    skipped.examples.extend(Skipped(**s) for s in state["skipped_examples"])
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    set_aside_newer(folder, int(state["step"]), accelerator)
    return state


def read_state(folder: Path) -> dict[str, Any]:
    """What mmcl keeps in a checkpoint besides the training state (step, config, ...)."""
    try:
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step in it")
        return state
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.resume: {folder / STATE_NAME} is not the JSON mmcl wrote there ({type(err).__name__}: "
                          f"{str(err)[:120]}); resume from another checkpoint, or start a new run") from None


def set_aside_newer(folder: Path, step: int, accelerator: Accelerator) -> None:
    """Resuming from an older checkpoint abandons the newer ones of that run: rename them so that
    `latest` and `keep_last` only see the run being continued (nothing is deleted)."""
    if accelerator.is_main_process:
        for newer in checkpoints(folder.parent.parent):
            if int(STEP_DIR.match(newer.name).group(1)) > step:
                os.replace(newer, newer.with_name(f".abandoned-{newer.name}"))
    accelerator.wait_for_everyone()


def save_final(model: Any, tokenizer: Any, image_processor: Any, config: dict[str, Any], final: Path,
               info: dict[str, Any] | None = None, state_dict: dict[str, Any] | None = None,
               zero_shot: dict[str, Any] | None = None) -> None:
    """The trained model with its tokenizer, image processor and resolved config (`Config.to_dict()`), atomically;
    `info` (e.g. the step and metric of a best model) goes to `mmcl_info.json`; `state_dict`: the
    full weights gathered from a sharded `model` (`accelerator.get_state_dict`). A full disk or an
    unwritable folder raises `SaveError`; an earlier `final` stays as it was."""
    def weights() -> int:
        return sum(t.numel() * t.element_size() for t in (state_dict or model.state_dict()).values())

    with explain_write_errors(final, weights, final), atomic_dir(final, kind="model") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        save_training_config(tmp, config)  # nothing secret-looking
        if info:
            write_json(tmp / INFO_NAME, info)
        if zero_shot:  # the training captions' style and the templates that match it
            write_json(tmp / ZERO_SHOT_NAME, zero_shot)
        scrub_config_files(tmp)
