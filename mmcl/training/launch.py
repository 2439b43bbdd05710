"""How this process joins the job: the Accelerator (one CPU, one GPU, DDP, FSDP2, DeepSpeed, one
node or many, as `accelerate launch` / `torchrun` set it up), reading a value that may be sharded,
the output folder's lock taken for all processes, and naming the process that was lost when a job
breaks.

The launch configs are in configs/accelerate/; nothing here replaces Accelerate or torch.distributed.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.state import PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list

from ..artifacts import LOGS_DIR, RunLock
from ..config import ConfigError, StopError, TrainConfig

ROLL_CALL_S = 15.0  # after a failed collective, how long the survivors wait for each other to answer


def build_accelerator(cfg: TrainConfig, log_with: Any = None) -> Accelerator:
    """The run's Accelerator (an unresolved `train.mixed_precision: auto` is resolved here first)."""
    if cfg.mixed_precision == "auto":
        from .auto import detect_device

        cfg.mixed_precision = "bf16" if detect_device().bf16 else "no"
    acc = Accelerator(
        # with no GPU (or other accelerator), torchrun / accelerate launch run gloo on the CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        # trackers that keep files (tensorboard) keep them in the run's logs/, beside metrics.jsonl
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, LOGS_DIR)),
        # the same shuffled order on every rank and in every run with the same seed: exact resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # the schedule counts optimizer steps of the global batch, whatever the number of processes
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
    )
    shard_on_cpu(acc)
    return acc


def shard_on_cpu(acc: Accelerator) -> None:
    """Honour an FSDP launch config on CPU processes (gloo).

    Accelerate only enters FSDP on accelerator devices: on CPU it silently runs DDP instead. FSDP2
    itself (`fully_shard`, DTensor, distributed checkpoints) runs on gloo, so mark the state as FSDP
    before anything is prepared: the same launch config then shards here as it does on GPUs.
    DeepSpeed has no CPU path in Accelerate; asking for it on CPU is an error, not a silent DDP run.
    """
    if acc.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("a DeepSpeed launch config on CPU processes: Accelerate runs DeepSpeed only on GPUs and "
                          "would silently train with DDP here; use configs/accelerate/fsdp2_cpu.yaml to shard on CPU")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launch config's FSDP_* settings
    if plugin.fsdp_version != 2:
        raise ConfigError("on CPU processes mmcl shards with FSDP2 only: set fsdp_version: 2 in the launch config")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far, in MiB: allocated on a CUDA device, else resident (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def is_sharded(acc: Accelerator) -> bool:
    """Parameters are split across processes (FSDP, DeepSpeed ZeRO-3): read them with `full_value`,
    save them through `accelerator.get_state_dict`."""
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextmanager
def whole(params: list[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """DeepSpeed ZeRO-3 keeps only a partition of each parameter on a process: gather `params` for
    the block (and, with `modify`, write rank 0's change back). Elsewhere it does nothing; FSDP2's
    DTensors take elementwise in-place ops (a clamp) on their shards as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def full_value(tensor: torch.Tensor) -> float:
    """A one-element parameter's value, also when it is sharded (an FSDP2 DTensor, a ZeRO-3
    partition): then every process must call this (it gathers)."""
    with whole([tensor]):
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        return float(tensor.detach().float().cpu().reshape(()))


def roll_call(acc: Accelerator, timeout_s: float = ROLL_CALL_S) -> list[int] | None:
    """After a collective failed: which ranks are lost? Each survivor checks in at the job's store
    (the launcher's rendezvous store, which outlives the workers) and waits up to `timeout_s` for
    the others. Returns the ranks that did not answer, or None when the store cannot be reached."""
    prefix = f"mmcl/roll-call/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=timedelta(seconds=timeout_s))
        store.set(f"{prefix}/{acc.process_index}", "here")
        deadline = time.monotonic() + timeout_s
        missing = list(range(acc.num_processes))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.2)
        return missing
    except (RuntimeError, OSError, ValueError):  # the store went down with the node that held it
        return None


def release_reducer(model: torch.nn.Module) -> None:
    """Free DDP's Reducer while the process group is still registered, before `end_training`.

    Otherwise the Reducer holds the group's last reference, and its destructor joins gloo's worker
    threads with the GIL held, while a worker waits for the GIL to free a finished collective's
    tensors: a deadlock (py-spy: ~ProcessGroupGloo -> thread::join; the worker in
    ~AsyncAllgatherWork -> decref_pyobject). It hung ~1 in 10 two-process test runs after the
    model was saved. The group's own Python handle releases the GIL in its destructor. The model
    cannot take a distributed step afterwards."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and getattr(model, "reducer", None) is not None:
        del model.reducer


def claim_output_dir(lock: RunLock, acc: Accelerator, check: Callable[[], None] = lambda: None) -> None:
    """The main process locks the output folder, then runs `check` (may this run write there?); when
    another run holds the folder or `check` refuses, every process stops with the same error."""
    outcome: list[Any] = [None, None]  # (the error, a warning)
    if acc.is_main_process:
        try:
            outcome = [None, lock.acquire()]
            check()
        except (OSError, ConfigError) as error:  # in use, unwritable, refused: every process stops, not only this one
            lock.release()
            outcome = [error, None]
    error, warning = broadcast_object_list(outcome)
    if error:
        raise error
    if warning:
        acc.print(f"warning: {warning}")


class LostProcessError(StopError):
    """Another process of the job is gone; this one stopped instead of waiting for it."""


# how gloo, NCCL and the store word a collective that another process will never join
PEER_FAILURE = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
                "nccl", "gloo", "socket")


def is_peer_failure(error: BaseException) -> bool:
    return isinstance(error, torch.distributed.DistError) or any(w in str(error).lower() for w in PEER_FAILURE)


def check_lost_process(acc: Accelerator, step: int, error: BaseException) -> None:
    """Raise a LostProcessError that names the lost ranks when `error` is a collective that failed
    because another process is gone; return (the caller re-raises `error`) otherwise."""
    if acc.num_processes < 2 or "MASTER_ADDR" not in os.environ or not is_peer_failure(error):
        return  # one process, or a launcher without a store to meet at
    missing = roll_call(acc)
    if missing == []:  # everyone answered: not a lost process
        return
    who = (f"rank {', '.join(map(str, missing))} of {acc.num_processes} did not answer within {ROLL_CALL_S:.0f} s"
           if missing else f"the job's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                           "is unreachable: the node that held it is gone")
    first_line = (str(error).splitlines() or [""])[0][:200]
    raise LostProcessError(f"lost a process at step {step}: {who} (killed, out of memory, or its node went down); "
                           f"rank {acc.process_index} stops here. Resume the job with --train.resume=latest "
                           f"[{type(error).__name__}: {first_line}]") from error
