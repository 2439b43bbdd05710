"""What a training step costs and how fast the device could go, for the MFU every log line carries.

`flops_per_sample` counts the towers' forward and backward FLOPs once, at the start, with torch's
`FlopCounterMode` on a copy of the model on the meta device (no memory, no compute, no effect on the
run's random state), at the first batch's real shapes (the text at its padded length). Activation
checkpointing's recomputation and LoRA adapters are not counted: MFU is of the model's FLOPs.

`peak_tflops` is the device's dense peak at the training precision: a table of known GPUs (vendor
figures, no sparsity), or on CPU a short matmul probe (what this process's threads reach on a
large matmul, a practical ceiling rather than a datasheet one). MFU = achieved / peak.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Dense tensor-core bf16/fp16 and plain fp32 TFLOP/s per GPU (vendor data sheets; no sparsity).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 66.9), "H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "H800": (989.4, 66.9),
    "GH200": (989.4, 66.9), "B200": (2250.0, 80.0), "A100": (312.0, 19.5), "A800": (312.0, 19.5),
    "L40S": (362.1, 91.6), "L40": (181.0, 90.5), "L4": (121.0, 30.3), "A10G": (70.0, 35.0), "A10": (125.0, 31.2),
    "A6000": (154.8, 38.7), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
}
# no attention mask: the masking code asks for its values (a meta tensor has none); the FLOPs are the same
INPUT_KEYS = ("input_ids", "pixel_values", "view_pixel_values")


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(the peak TFLOP/s of one device at `precision` ("no" = fp32, "bf16", "fp16"), where it comes from)."""
    half = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (tensor, fp32) in GPU_PEAK_TFLOPS.items():  # the longer names first where they overlap
            if key in name:
                return (tensor if half else fp32), f"{name} data sheet, {'bf16/fp16' if half else 'fp32'}"
        return None, f"{name} is not in mmcl.training.throughput.GPU_PEAK_TFLOPS"
    if device.type == "cpu":
        return cpu_matmul_tflops(torch.bfloat16 if precision == "bf16" else torch.float32), \
            f"CPU matmul probe, {torch.get_num_threads()} threads, {'bf16' if precision == 'bf16' else 'fp32'}"
    return None, f"no peak known for {device.type}"


def cpu_matmul_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """The best rate of (size x size) @ (size x size) matmuls over about `seconds`."""
    generator = torch.Generator().manual_seed(0)  # not the global one: the run's random state stays as it was
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


def flops_per_sample(model: torch.nn.Module, batch: dict[str, Any]) -> float | None:
    """Forward + backward FLOPs of one training example through the towers, projections and heads
    (None when the model cannot be copied to the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = type(model)(model.config)
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in twin.named_parameters():
        param.requires_grad_(name in trains)
    inputs = {k: torch.empty_like(v, device="meta") for k, v in batch.items() if k in INPUT_KEYS}
    rows = len(batch["pixel_values"])
    with FlopCounterMode(display=False) as counter:
        out = twin(**inputs)
        total = sum(e.float().sum() for e in (out.image_embeds, out.text_embeds, out.view_embeds) if e is not None)
        if total.requires_grad:
            total.backward()
    return counter.get_total_flops() / rows


class Throughput:
    """FLOPs per sample and the peak, once; then a window's achieved TFLOP/s and MFU."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device, self.precision = device, precision
        self.flops: float | None = None  # per sample, forward + backward
        self.peak: float | None = None
        self.about, self.measured = "", False

    def measure(self, model: torch.nn.Module, batch: dict[str, Any]) -> str:
        """Count the FLOPs on the run's first batch and find the peak; returns a line saying both."""
        self.measured = True
        try:
            self.flops = flops_per_sample(model, batch)
        except Exception as err:  # an exotic tower: the run goes on without MFU
            return f"throughput: could not count the model's FLOPs ({type(err).__name__}: {err}); no MFU logged"
        self.peak, self.about = peak_tflops(self.device, self.precision)
        peak = f"{self.peak:.3g} TFLOP/s per device ({self.about})" if self.peak else f"unknown ({self.about})"
        return f"throughput: {self.flops / 1e9:.3g} GFLOP per sample (forward + backward); peak {peak}"

    def logs(self, samples_per_s_per_device: float) -> dict[str, float]:
        """train/tflops and train/mfu, where they are known."""
        values = {"train/tflops": self.tflops(samples_per_s_per_device), "train/mfu": self.mfu(samples_per_s_per_device)}
        return {k: v for k, v in values.items() if v == v}

    def tflops(self, samples_per_s_per_device: float) -> float:
        return float("nan") if self.flops is None else self.flops * samples_per_s_per_device / 1e12

    def mfu(self, samples_per_s_per_device: float) -> float:
        return float("nan") if not self.peak else self.tflops(samples_per_s_per_device) / self.peak
