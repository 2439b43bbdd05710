"""One measurement of scripts/gpu_check.sh: mmcl's training step (the loop's `training_step`,
Objective, AdamW) on synthetic data, in whatever launch config `accelerate launch` gives it.

Run:  accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 scripts/gpu_check.py \
          [--config configs/gpu_check_vit_b32.yaml] [--steps 30] [--batch 256] [--peak-tflops 989]
Prints one JSON line: samples/s, peak memory, model FLOPs per sample (counted by
torch.utils.flop_counter on one step: forward + backward), and MFU = FLOPs/sample x samples/s /
(processes x the device's dense peak at the run's precision: mmcl.training.throughput's table of GPUs,
or its CPU matmul probe).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic(batch: int, length: int, size: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 2, (batch, length), generator=g)
    ids[:, -1] = vocab - 1  # an end-of-text token, as CLIP's text pooling expects
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device),
            "pair_ids": torch.arange(batch).to(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpu_check_vit_b32.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="per process; default: the config's")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak at the run's precision; default: mmcl's table / CPU probe")
    parser.add_argument("overrides", nargs="*", help="--section.key=value for the config")
    args, extra = parser.parse_known_args()

    from torch.utils.flop_counter import FlopCounterMode

    from mmcl.towers.build import build_model
    from mmcl.config_loader import load_config
    from mmcl.training.launch import build_accelerator
    from mmcl.losses import build_objective
    from mmcl.training.optimization import build_optimizer
    from mmcl.training.loop import training_step

    config = load_config(args.config, args.overrides + extra)
    config.train.output_dir = tempfile.mkdtemp(prefix="mmcl-gpu-check-")
    batch_size = args.batch or config.train.per_device_batch_size
    acc = build_accelerator(config.train)
    if acc.state.deepspeed_plugin is not None:  # no data loader is prepared: DeepSpeed needs the batch size
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    torch.manual_seed(0)
    model = build_model(config.model)
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, config.train)
    model, optimizer = acc.prepare(model, optimizer)
    objective = build_objective(config.loss, model, acc)
    text = config.model.text_config
    batch = synthetic(batch_size, config.model.max_text_length, config.model.image_size, text["vocab_size"], acc.device)

    def step() -> None:
        training_step(acc, model, objective, optimizer, dict(batch), config.train.max_grad_norm)

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_sample = counter.get_total_flops() / batch_size
    for _ in range(args.warmup):
        step()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    samples_per_s = args.steps * batch_size * acc.num_processes / elapsed
    from mmcl.training.throughput import peak_tflops

    peak_flops = args.peak_tflops or peak_tflops(acc.device, config.train.mixed_precision)[0] or float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    result = {"launch": str(acc.distributed_type).split(".")[-1], "processes": acc.num_processes,
              "precision": config.train.mixed_precision, "parameters_m": params / 1e6, "batch_per_process": batch_size,
              "steps": args.steps, "samples_per_s": samples_per_s, "peak_memory_gib": peak,
              "gflops_per_sample": flops_per_sample / 1e9,
              "peak_tflops": peak_flops, "mfu": flops_per_sample * samples_per_s / (acc.num_processes * peak_flops * 1e12)}
    if acc.is_main_process:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
