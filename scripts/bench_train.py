"""Training throughput and peak memory of mmcl's real training step against peers on identical towers.

Run:  python scripts/bench_train.py [--steps 10] [--batch 128] [--repeats 2] [--precisions no,bf16]
          [--set model.attn_implementation=eager --set train.optim=adamw_torch_fused ...]

Pairs, each on synthetic in-RAM data (the same batch for both sides of a pair):
  mmcl vs vtde          BERT + ViT towers (width 192, 4 layers, 32 tokens; ViT 64 px / patch 8),
                        projection 128, pooler outputs; vtde is a plain loop around transformers'
                        VisionTextDualEncoderModel(return_loss=True).
  mmcl_clip vs open_clip  the architecture of ../shared/bench/peer_train.py: ViT 64 px / patch 8 /
                        width 192 / 4 layers / 3 heads; text width 192 / 4 layers / 3 heads / 32
                        tokens / vocab 8000; GELU; embedding 128; 5.2 M parameters. open_clip.CLIP
                        with its ClipLoss and open_clip_train's step (AdamW, clamp); mmcl with
                        CLIPTextModel + CLIPVisionModel towers. Runs only where open_clip is importable:
                        it is not a dependency of mmcl, and its torchvision pulls a CUDA torch, so use a
                        separate environment, as ../shared/bench/README.md says:
                            python3 -m venv /tmp/venv-peer
                            /tmp/venv-peer/bin/pip install torch torchvision open-clip-torch transformers \\
                                accelerate datasets evaluate pyyaml
                            /tmp/venv-peer/bin/pip install --no-deps -e .
                            /tmp/venv-peer/bin/python scripts/bench_train.py
mmcl runs `mmcl.training.loop.training_step` with `build_model` / `build_optimizer` (lr 1e-4, wd 0.1, no
clipping, as the peers); `--set section.key=value` applies a model / train config option to the mmcl
sides only (e.g. the speed options). Each (implementation, precision) runs in its own process, so
peak RSS (or peak CUDA memory) is its own; runs are interleaved and repeated; samples/s is over the
median step after 3 warm-up steps, and ratios mmcl / peer are taken within this one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

PAIRS = {"mmcl": "vtde", "mmcl_clip": "open_clip"}
LR, WD = 1e-4, 0.1
WIDTH, LAYERS, HEADS, TOKENS, VOCAB, IMAGE, PATCH, EMBED = 192, 4, 3, 32, 8000, 64, 8, 128


def bert_vit() -> tuple[dict, dict]:
    text = dict(model_type="bert", hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=4 * WIDTH, vocab_size=VOCAB, max_position_embeddings=64)
    vision = dict(model_type="vit", hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=4 * WIDTH, image_size=IMAGE, patch_size=PATCH)
    return text, vision


def clip_towers() -> tuple[dict, dict]:
    """open_clip.CLIP's architecture in transformers' CLIP classes (GELU, as open_clip's default)."""
    text = dict(model_type="clip_text_model", hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=TOKENS, eos_token_id=VOCAB - 1,
                hidden_act="gelu")
    vision = dict(model_type="clip_vision_model", hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
                  hidden_act="gelu")
    return text, vision


def synthetic(batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB - 1, (batch, TOKENS), generator=g)
    ids[:, -1] = VOCAB - 1  # an end-of-text token where CLIP pools
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, TOKENS, dtype=torch.long, device=device),
            "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(device)}


def autocast(device: str, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)


def mmcl_step_fn(impl: str, precision: str, options: list[str]) -> tuple[Callable, str]:
    from accelerate import Accelerator

    from mmcl.towers.build import build_model
    from mmcl.config import ModelConfig, TrainConfig
    from mmcl.config_loader import build_section, parse_overrides
    from mmcl.losses import ClipLoss, Objective
    from mmcl.training.optimization import build_optimizer
    from mmcl.training.loop import training_step

    text, vision = clip_towers() if impl == "mmcl_clip" else bert_vit()
    chosen = parse_overrides([f"--{o}" for o in options])
    model_cfg = build_section(ModelConfig, {"text_config": text, "vision_config": vision, "projection_dim": EMBED,
                                            **chosen.pop("model", {})}, "model")
    train_cfg = build_section(TrainConfig, {"learning_rate": LR, "weight_decay": WD, "adam_epsilon": 1e-8,
                                            "max_grad_norm": None, "mixed_precision": precision,
                                            **chosen.pop("train", {})}, "train")
    if chosen:
        sys.exit(f"--set: only model.* and train.* options apply here, got {sorted(chosen)}")
    model = build_model(model_cfg).train()
    accelerator = Accelerator(mixed_precision=train_cfg.mixed_precision, cpu=not torch.cuda.is_available())
    optimizer = build_optimizer(model, train_cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = Objective(ClipLoss(), accelerator)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = training_step(accelerator, model, objective, optimizer, dict(batch), train_cfg.max_grad_norm).loss
        accelerator.unwrap_model(model).clamp_logit_scale()
        return loss
    return step, str(accelerator.device)


def vtde_step_fn(precision: str) -> tuple[Callable, str]:
    from transformers import AutoConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text, vision = (AutoConfig.for_model(**c) for c in bert_vit())
    model = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=EMBED)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, precision):
            loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step, device


def open_clip_step_fn(precision: str) -> tuple[Callable, str]:
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_clip.CLIP(embed_dim=EMBED, output_dict=True,
                           vision_cfg={"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": LAYERS,
                                       "head_width": WIDTH // HEADS, "mlp_ratio": 4},
                           text_cfg={"context_length": TOKENS, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS,
                                     "layers": LAYERS}).to(device).train()
    loss_fn = OpenClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": WD}], lr=LR)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # open_clip_train's train_one_epoch, accum_freq 1
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(**model(batch["pixel_values"], batch["input_ids"]))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return loss.detach()
    return step, device


def worker(impl: str, precision: str, batch: int, steps: int, options: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    step, device = (vtde_step_fn(precision) if impl == "vtde" else open_clip_step_fn(precision)
                    if impl == "open_clip" else mmcl_step_fn(impl, precision, options))
    data = synthetic(batch, device)
    for _ in range(3):  # warm-up: allocator, kernels
        step(data)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(data).item()  # .item() waits for the device
        times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"samples_per_s": batch / statistics.median(times), "peak_mb": peak_mb, "last_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a model.* / train.* option for the mmcl sides, e.g. model.attn_implementation=eager")
    parser.add_argument("--pairs", default=None, help="mmcl,mmcl_clip (default: both; mmcl_clip needs open_clip)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.steps, args.set)))
        return
    pairs = args.pairs.split(",") if args.pairs else [
        p for p in PAIRS if p != "mmcl_clip" or importlib.util.find_spec("open_clip")]
    if "mmcl_clip" not in pairs:
        print("open_clip is not importable here: the mmcl_clip vs open_clip pair is left out (see --help)")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(args.repeats):
        for precision in args.precisions.split(","):
            for mine in pairs:
                order = (mine, PAIRS[mine]) if rep % 2 == 0 else (PAIRS[mine], mine)  # alternate who goes first
                for impl in order:
                    cmd = [sys.executable, __file__, "--worker", impl, precision, "--batch", str(args.batch),
                           "--steps", str(args.steps), *(f"--set={o}" for o in args.set)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"{impl} ({precision}) failed:\n{out.stderr[-3000:]}")
                    results.setdefault((impl, precision), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results, pairs, args)


def report(results: dict, pairs: list[str], args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    print(f"device={device} batch={args.batch} steps={args.steps} repeats={args.repeats} (median of repeats); "
          f"mmcl options: {' '.join(args.set) or 'defaults'}")
    print(f"{'precision':<10}{'pair':<22}{'mmcl samples/s':>16}{'peer samples/s':>16}{'ratio':>8}"
          f"{'mmcl ' + memory:>18}{'peer ' + memory:>18}{'ratio':>8}")
    for precision in args.precisions.split(","):
        for mine in pairs:
            m, p = ({k: statistics.median(r[k] for r in results[(impl, precision)]) for k in ("samples_per_s", "peak_mb")}
                    for impl in (mine, PAIRS[mine]))
            print(f"{precision:<10}{mine + ' / ' + PAIRS[mine]:<22}{m['samples_per_s']:>16.1f}{p['samples_per_s']:>16.1f}"
                  f"{m['samples_per_s'] / p['samples_per_s']:>8.3f}{m['peak_mb']:>18.0f}{p['peak_mb']:>18.0f}"
                  f"{m['peak_mb'] / p['peak_mb']:>8.3f}")


if __name__ == "__main__":
    main()
