"""Training throughput and peak memory: mmcl against a plain loop around transformers'
`VisionTextDualEncoderModel(return_loss=True)`, on identical towers and synthetic data.

Run:  python scripts/bench_train.py [--steps 10] [--batch 128] [--repeats 2]
Each (implementation, precision) runs in its own process, so peak memory is its own; runs are
interleaved and repeated, and the ratio mmcl / baseline is computed within this one run.
Architecture (fixed): ViT 64 px / patch 8 / width 192 / 4 layers; BERT width 192 / 4 layers,
32 tokens; projection 128. Both use each tower's pooler_output, as VisionTextDualEncoderModel does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def towers():
    from transformers import BertConfig, ViTConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    vision = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                       image_size=64, patch_size=8)
    text = BertConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                      vocab_size=8000, max_position_embeddings=64)
    return VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=128))


def synthetic(batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 8000, (batch, 32), generator=g).to(device),
            "attention_mask": torch.ones(batch, 32, dtype=torch.long, device=device),
            "pixel_values": torch.randn(batch, 3, 64, 64, generator=g).to(device)}


def mmcl_step_fn(precision: str):
    from accelerate import Accelerator

    from mmcl.losses import ClipLoss, Objective
    from mmcl.model import DualEncoder, DualEncoderConfig
    from mmcl.train import training_step

    source = towers()
    model = DualEncoder(DualEncoderConfig(source.text_model.config.to_dict(), source.vision_model.config.to_dict(),
                                          projection_dim=128), source.text_model, source.vision_model)
    model.text_projection.load_state_dict(source.text_projection.state_dict())
    model.visual_projection.load_state_dict(source.visual_projection.state_dict())
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = Objective(ClipLoss(), accelerator)

    def step(batch):
        loss, _, _ = training_step(accelerator, model, loss_fn, optimizer, dict(batch), 1.0)
        accelerator.unwrap_model(model).clamp_logit_scale()
        return loss
    return step, accelerator.device


def baseline_step_fn(precision: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = towers().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(batch):
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step, device


def worker(impl: str, precision: str, batch: int, steps: int) -> dict[str, float]:
    step, device = (mmcl_step_fn if impl == "mmcl" else baseline_step_fn)(precision)
    data = synthetic(batch, str(device))
    for _ in range(3):  # warm-up: allocator, autotuning
        step(data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(data)
    loss.item()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"samples_per_s": batch * steps / elapsed, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.steps)))
        return
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for precision in args.precisions.split(","):
            for impl in ("mmcl", "baseline"):
                out = subprocess.run([sys.executable, __file__, "--worker", impl, precision, "--batch", str(args.batch),
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                results.setdefault((impl, precision), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    print(f"device={device} batch={args.batch} steps={args.steps} repeats={args.repeats} (median of repeats)")
    print(f"{'precision':<10}{'mmcl samples/s':>16}{'baseline samples/s':>20}{'ratio':>8}"
          f"{'mmcl ' + memory:>20}{'baseline ' + memory:>24}")
    for precision in args.precisions.split(","):
        m = {k: statistics.median(r[k] for r in results[("mmcl", precision)]) for k in ("samples_per_s", "peak_mb")}
        b = {k: statistics.median(r[k] for r in results[("baseline", precision)]) for k in ("samples_per_s", "peak_mb")}
        print(f"{precision:<10}{m['samples_per_s']:>16.1f}{b['samples_per_s']:>20.1f}"
              f"{m['samples_per_s'] / b['samples_per_s']:>8.3f}{m['peak_mb']:>20.0f}{b['peak_mb']:>24.0f}")


if __name__ == "__main__":
    main()
