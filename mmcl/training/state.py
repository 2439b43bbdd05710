"""The training state of a checkpoint as safetensors and JSON, written and read without pickle.

A checkpoint folder holds (besides `mmcl_train_state.json`, written by `checkpoint.save`):

    model.safetensors        the weights that train, and the buffers (frozen weights are rebuilt from the config)
    optimizer.safetensors    every tensor of the optimizer's state, as `state/<parameter>/<name>`
    optimizer.json           its parameter groups and any non-tensor state
    scheduler.json           the learning-rate schedule's state
    objective.safetensors    the loss's state (a queue and its momentum copy), when it has one
    scaler.json              fp16's gradient scaler, when there is one
    rng_<rank>.safetensors   each process's torch random state (CPU, and its accelerator's)
    rng_<rank>.json          and its Python and NumPy random states

Model and optimizer go through torch's distributed state-dict API, so one format serves one process,
DDP and FSDP2 (whose shards are gathered on save and scattered on load). Checkpoints written before
this format (Accelerate's pickles) are read with `torch.load(weights_only=True)`, torch's restricted
unpickler that builds tensors and plain containers and refuses anything else; what that cannot read
is refused with a one-line error (`LegacyStateError`), never unpickled. DeepSpeed's engine keeps
its own checkpoint format (torch pickles, which DeepSpeed saves and loads itself); docs/trust.md
says so.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..config import ConfigError

MODEL, OPTIMIZER, SCHEDULER, OBJECTIVE, SCALER = ("model.safetensors", "optimizer", "scheduler.json",
                                                  "objective.safetensors", "scaler.json")
LEGACY_FILES = ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")


class LegacyStateError(ConfigError):
    """A checkpoint of an earlier mmcl whose state cannot be read without unpickling."""


def _options(accelerator: Accelerator, strict: bool = True) -> Any:
    """Full (gathered) state dicts when parameters are sharded; each process's own otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from .launch import is_sharded

    sharded = is_sharded(accelerator)
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded, broadcast_from_rank0=sharded, strict=strict)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: the prepared model and optimizer, the schedule, the
    objective (when it has state: a queue), and which model tensors to write (`keep`: frozen weights
    are not; None: all)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: torch.nn.Module | None = None
    keep: Callable[[str], bool] | None = None

    def save(self, folder: Path, accelerator: Accelerator) -> None:
        if _deepspeed(accelerator):
            accelerator.save_state(str(folder))
            return
        save_state(folder, accelerator, self.model, self.optimizer, self.scheduler, self.objective, self.keep)

    def load(self, folder: Path, accelerator: Accelerator) -> None:
        if _deepspeed(accelerator):
            accelerator.load_state(str(folder))
            return
        load_state(folder, accelerator, self.model, self.optimizer, self.scheduler, self.objective,
                   strict=self.keep is None)


def _deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


# --- save ------------------------------------------------------------------------------------------
def save_state(folder: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, objective: torch.nn.Module | None = None,
               keep: Callable[[str], bool] | None = None) -> None:
    """Write the training state into `folder` (every process calls this: a sharded model is gathered).
    `keep(name)`: whether a model tensor is written (frozen weights are not); None: all."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(accelerator)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    # the objective's EMA copies are sharded as the model is (gathered here); its queues are alike on every process
    extra = None if objective is None else get_model_state_dict(objective, options=options)
    if accelerator.is_main_process:
        save_file(_contiguous({k: v for k, v in weights.items() if keep is None or keep(k)}), folder / MODEL)
        _save_optimizer(folder, optim)
        _write_json(folder / SCHEDULER, _json_safe(scheduler.state_dict()))
        if extra is not None:
            save_file(_contiguous(extra), folder / OBJECTIVE)
        if accelerator.scaler is not None:
            _write_json(folder / SCALER, accelerator.scaler.state_dict())
    _save_rng(folder, accelerator)


def _save_optimizer(folder: Path, state: dict[str, Any]) -> None:
    tensors, rest = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{name}"] = value
            else:
                rest.setdefault(str(param), {})[name] = value
    save_file(_contiguous(tensors), folder / f"{OPTIMIZER}.safetensors")
    _write_json(folder / f"{OPTIMIZER}.json", {"param_groups": _json_safe(state["param_groups"]), "state": rest})


def _json_safe(value: Any) -> Any:
    """Plain JSON: tuples as lists, tensors as numbers or lists; what JSON cannot hold (a function
    in a schedule's state) is dropped: nothing loads code back."""
    if isinstance(value, dict):
        kept = {str(k): _json_safe(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _DROP


_DROP = object()


def _save_rng(folder: Path, accelerator: Accelerator) -> None:
    rank = accelerator.process_index
    tensors = {"torch_cpu": torch.get_rng_state()}
    device = accelerator.device
    if device.type not in ("cpu", "meta"):
        tensors["device"] = torch.get_device_module(device).get_rng_state()
    save_file(tensors, folder / f"rng_{rank}.safetensors")
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    _write_json(folder / f"rng_{rank}.json", {"python": [version, list(state), gauss],
                                              "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]})


# --- load ------------------------------------------------------------------------------------------
def load_state(folder: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, objective: torch.nn.Module | None = None, strict: bool = True) -> None:
    """Restore what `save_state` wrote (or, from an earlier mmcl, what Accelerate wrote, read without
    unpickling). `strict` False: the checkpoint left frozen weights out."""
    if not (folder / f"{OPTIMIZER}.safetensors").is_file():
        return load_legacy(folder, accelerator, model, optimizer, scheduler, objective, strict)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(accelerator, strict)
    reads = accelerator.is_main_process or not options.broadcast_from_rank0  # sharded: rank 0 reads and sends
    weights = load_file(folder / MODEL) if reads else {}
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, _load_optimizer(folder) if reads else {}, options=options)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text(encoding="utf-8")))
    if objective is not None:
        state = load_file(folder / OBJECTIVE) if reads else {}  # on the CPU: copied onto the objective's device
        set_model_state_dict(objective, state, options=_options(accelerator))
    if accelerator.scaler is not None and (folder / SCALER).is_file():
        accelerator.scaler.load_state_dict(json.loads((folder / SCALER).read_text(encoding="utf-8")))
    _load_rng(folder, accelerator)


def _load_optimizer(folder: Path) -> dict[str, Any]:
    saved = json.loads((folder / f"{OPTIMIZER}.json").read_text(encoding="utf-8"))
    state: dict[str, dict[str, Any]] = {p: dict(v) for p, v in saved["state"].items()}
    for key, tensor in load_file(folder / f"{OPTIMIZER}.safetensors").items():
        _, param, name = key.split("/", 2)
        state.setdefault(param, {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_rng(folder: Path, accelerator: Accelerator) -> None:
    rank = accelerator.process_index
    path = folder / f"rng_{rank}.safetensors"
    if not path.is_file():
        raise ConfigError(f"train.resume: {folder} has no random state for process {rank} (was it saved with "
                          "another number of processes?)")
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch_cpu"])
    if "device" in tensors and accelerator.device.type not in ("cpu", "meta"):
        torch.get_device_module(accelerator.device).set_rng_state(tensors["device"])
    saved = json.loads((folder / f"rng_{rank}.json").read_text(encoding="utf-8"))
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- checkpoints of an earlier mmcl ------------------------------------------------------------------
def _restricted_load(path: Path) -> Any:
    """torch.load with torch's restricted unpickler (tensors, plain containers, NumPy arrays and dtypes:
    what an RNG state holds); anything else raises instead of running."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    safe = [np.ndarray, np.dtype, np.dtypes.UInt32DType, core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LegacyStateError(
            f"train.resume: {path} (written by an earlier mmcl) can only be read by unpickling it, which mmcl "
            f"does not do: it could run code ({type(err).__name__}). Start a new run from that run's saved model "
            f"instead, e.g. --model.init_from={folder_of_run(path)}/final") from None


def folder_of_run(path: Path) -> Path:
    """<output_dir> of a file inside <output_dir>/checkpoints/step-N/."""
    return path.parent.parent.parent


def load_legacy(folder: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, objective: torch.nn.Module | None, strict: bool) -> None:
    """A checkpoint Accelerate wrote (mmcl before this format): model.safetensors, optimizer.bin,
    custom_checkpoint_<i>.pkl (the schedule, then the objective), random_states_<rank>.pkl."""
    if not (folder / "optimizer.bin").is_file():
        raise LegacyStateError(f"train.resume: {folder} is not a checkpoint mmcl can read without unpickling (no "
                               f"{OPTIMIZER}.safetensors, no optimizer.bin); start a new run, e.g. with "
                               f"--model.init_from={folder_of_run(folder / 'x')}/final")
    weights = load_file(folder / MODEL)
    accelerator.unwrap_model(model).load_state_dict(weights, strict=strict)
    optimizer.load_state_dict(_restricted_load(folder / "optimizer.bin"))
    scheduler.load_state_dict(_restricted_load(folder / "custom_checkpoint_0.pkl"))
    if objective is not None:
        objective.load_state_dict(_restricted_load(folder / "custom_checkpoint_1.pkl"))
    states = _restricted_load(folder / f"random_states_{accelerator.process_index}.pkl")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
