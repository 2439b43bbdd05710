"""GradCache (`loss.cache_chunk`), or activation checkpointing in both towers
(`model.*_activation_checkpointing`, with --compare checkpointing): the largest batch one training
step fits in a fixed memory budget with and without it, and the time per sample of both at the
same batch.

Run:  python scripts/bench_loss.py [--budget-mb 400] [--chunk 64] [--max-batch 16384] [--threads 2]
      python scripts/bench_loss.py --compare checkpointing --budget-mb 8192
Towers: the quickstart's (BERT 128 x 3, ViT 48 px / patch 8 / 128 x 4, 24 tokens, embedding 128).
Memory: the peak resident memory of one full training step (forward, loss, backward, AdamW step)
above the resident memory just before it, the synthetic inputs and the optimizer state already
allocated (Linux: /proc/self/clear_refs resets the peak). Each point runs in its own process.
The batch doubles from 64 until the step no longer fits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(chunk: int, checkpointing: int = 0):
    from accelerate import Accelerator

    from mmcl.towers.build import build_model
    from mmcl.config_loader import load_config
    from mmcl.losses import ClipLoss, Objective

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml").model
    cfg.text_config["vocab_size"] = 3000
    cfg.text_activation_checkpointing = cfg.vision_activation_checkpointing = bool(checkpointing)
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = acc.prepare(model, optimizer)
    return acc, model, optimizer, Objective(ClipLoss(), acc, cache_chunk=chunk)


def synthetic(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 3000, (batch, 24), generator=g),
            "attention_mask": torch.ones(batch, 24, dtype=torch.long),
            "pixel_values": torch.randn(batch, 3, 48, 48, generator=g)}


def worker(batch: int, chunk: int, steps: int, checkpointing: int) -> dict[str, float]:
    from mmcl.training.loop import training_step

    acc, model, optimizer, objective = build(chunk, checkpointing)
    training_step(acc, model, objective, optimizer, synthetic(8), None)  # optimizer state allocated
    inputs = synthetic(batch)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from here
    base = _kib("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        training_step(acc, model, objective, optimizer, dict(inputs), None)
    elapsed = time.perf_counter() - start
    return {"batch": batch, "chunk": chunk, "checkpointing": checkpointing, "peak_mb": (_kib("VmHWM") - base) / 1024,
            "s_per_sample": elapsed / (steps * batch)}


def measure(batch: int, chunk: int, steps: int, threads: int, checkpointing: int = 0) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", str(batch), str(chunk), str(steps), str(checkpointing),
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_fitting(chunk: int, budget_mb: float, max_batch: int, threads: int,
                    checkpointing: int = 0) -> tuple[int, list[dict]]:
    points, batch, best = [], 64, 0
    while batch <= max_batch:
        point = measure(batch, chunk, 1, threads, checkpointing)
        points.append(point)
        print(json.dumps(point), flush=True)
        if point["peak_mb"] > budget_mb:
            break
        best, batch = batch, batch * 2
    return best, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, default=400.0)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2, help="timed steps at the common batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=["cache", "checkpointing"], default="cache")
    parser.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.compare == "checkpointing":
        compare_checkpointing(args)
        return
    plain, _ = largest_fitting(0, args.budget_mb, args.max_batch, args.threads)
    cached, _ = largest_fitting(args.chunk, args.budget_mb, args.max_batch, args.threads)
    common = max(plain, 64)
    timing = {name: measure(common, chunk, args.steps, args.threads) for name, chunk in (("plain", 0), ("cached", args.chunk))}
    result = {"budget_mb": args.budget_mb, "chunk": args.chunk, "max_batch_plain": plain, "max_batch_cached": cached,
              "max_batch_ratio": cached / max(plain, 1), "batch_timed": common,
              "ms_per_sample_plain": 1000 * timing["plain"]["s_per_sample"],
              "ms_per_sample_cached": 1000 * timing["cached"]["s_per_sample"],
              "time_ratio": timing["cached"]["s_per_sample"] / timing["plain"]["s_per_sample"]}
    print(json.dumps(result, indent=1))


def compare_checkpointing(args: argparse.Namespace) -> None:
    plain, points = largest_fitting(0, args.budget_mb, args.max_batch, args.threads)
    ckpt, ckpt_points = largest_fitting(0, args.budget_mb, args.max_batch, args.threads, checkpointing=1)
    common = 256
    timing = {on: measure(common, 0, args.steps, args.threads, on) for on in (0, 1)}
    at = {p["batch"]: p["peak_mb"] for p in points}
    at_ckpt = {p["batch"]: p["peak_mb"] for p in ckpt_points}
    print(json.dumps({"budget_mb": args.budget_mb, "max_batch_plain": plain, "max_batch_checkpointing": ckpt,
                      "peak_mb_at_batch": {b: [at[b], at_ckpt[b]] for b in at if b in at_ckpt},
                      "batch_timed": common, "ms_per_sample_plain": 1000 * timing[0]["s_per_sample"],
                      "ms_per_sample_checkpointing": 1000 * timing[1]["s_per_sample"],
                      "time_ratio": timing[1]["s_per_sample"] / timing[0]["s_per_sample"]}, indent=1))


if __name__ == "__main__":
    main()
