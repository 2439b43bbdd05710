"""What `auto` means: for `model.attn_implementation`, `train.optim` and `train.mixed_precision`, the
choice the benchmarks in scripts/ measured fastest for this device. A value the user gives always
wins; `auto` is resolved once at the start of a run, printed, and saved in the run's config.

Measured (docs/results.md, scripts/bench_train.py and the shared side-by-side harness):
- bf16 autocast: faster than fp32 wherever the hardware has bf16 arithmetic (CPUs with AVX512-BF16 or
  AMX, GPUs from Ampere on); elsewhere fp32 (bf16 emulated is slower, and fp16 needs loss scaling).
- eager attention: on CPU under bf16 it took half the step time of SDPA (torch's CPU flash-attention
  backward took 47% of the step); on CUDA, SDPA (flash / memory-efficient kernels) is the fast one.
- fused AdamW: the same update as the multi-tensor one in fewer kernels, where torch has it for the
  device; sharded parameters (FSDP, DeepSpeed) keep the multi-tensor one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class Device:
    """What the choices depend on: `kind` (cpu, cuda, ...), whether it has bf16 arithmetic, its name."""

    kind: str
    bf16: bool
    name: str


def detect_device() -> Device:
    """This process's accelerator (the one Accelerate will use), or the CPU."""
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        if kind == "cuda":
            return Device(kind, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
        return Device(kind, False, kind)
    return Device("cpu", cpu_has_bf16(), "cpu")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def sharded_launch() -> bool:
    """An FSDP or DeepSpeed launch (read before the Accelerator exists, as Accelerate reads it)."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true" for name in ("FSDP", "DEEPSPEED"))


def resolve_auto(model: ModelConfig, train: TrainConfig, device: Device, sharded: bool = False) -> list[str]:
    """Replace each `auto` in place with this device's choice; returns one line per choice made."""
    said = []
    if train.mixed_precision == "auto":
        train.mixed_precision = "bf16" if device.bf16 else "no"
        why = "has bf16 arithmetic" if device.bf16 else "has no bf16 arithmetic: fp32"
        said.append(f"train.mixed_precision={train.mixed_precision} ({device.name} {why})")
    if model.attn_implementation == "auto":
        eager = device.kind == "cpu" and train.mixed_precision == "bf16"
        model.attn_implementation = "eager" if eager else "sdpa"
        said.append(f"model.attn_implementation={model.attn_implementation} "
                    f"({'CPU under bf16: SDPA backward is slow there' if eager else 'SDPA kernels'})")
    if train.optim == "auto":
        fused = not sharded and device.kind in ("cpu", "cuda", "xpu", "mps")
        train.optim = "adamw_torch_fused" if fused else "adamw_torch"
        said.append(f"train.optim={train.optim} ({'fused kernel' if fused else 'sharded parameters: multi-tensor'})")
    return said
