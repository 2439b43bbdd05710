"""Decoding + augmentation throughput per CPU core, and how many cores one GPU needs to be fed.

Run:  python scripts/bench_data.py [--images 300] [--size 512] [--repeats 3] [--peer-python /tmp/venv-peer/bin/python]

Writes `--images` photo-like images of `--size` px (gradients, edges, noise) as JPEG (quality 90)
and as PNG, then measures, in one process with one thread (what one DataLoader worker does), the
images/s of turning a file into a 224 px training tensor with a random resized crop:
  mmcl          `make_pair` with a `PairRecipe` (crop scale 0.9-1 like open_clip's training transform,
                no jitter): read, decode (JPEGs at a reduced scale: Pillow's draft mode), crop, resize,
                normalise;
  mmcl, full    the same with draft decoding off (every JPEG decoded at full size): the "before";
  open_clip     open_clip 3.3's training transform (RandomResizedCrop(224, scale=(0.9, 1)), ToTensor,
                Normalize) on PIL.Image.open(...).convert("RGB"), run with --peer-python (an environment
                with open_clip and torchvision; see ../shared/bench/README.md); skipped without it.
Then: cores needed to feed 2,800 samples/s (an H100 training ViT-B/32 at batch 4096) = 2800 / rate.
Runs alternate; medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

H100_VIT_B32 = 2800.0  # samples/s one H100 trains ViT-B/32 at (open_clip's published throughput, rounded)

OPEN_CLIP = """
import json, sys, time
import torch
from PIL import Image
import open_clip
torch.set_num_threads(1)
transform = open_clip.image_transform(224, is_train=True)
paths = json.loads(sys.argv[1])
start = time.perf_counter()
for path in paths:
    transform(Image.open(path).convert("RGB"))
print(len(paths) / (time.perf_counter() - start))
"""


def write_images(folder: Path, n: int, size: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:int(size * 4 / 3)] / size
    paths: dict[str, list[Path]] = {"jpeg": [], "png": []}
    for i in range(n):
        base = np.stack([xx * rng.uniform(0, 200), yy * rng.uniform(0, 200), (xx + yy) * rng.uniform(0, 100)], -1)
        base += ((np.floor(xx * 12) + np.floor(yy * 12)) % 2)[..., None] * rng.uniform(0, 50)  # edges
        pixels = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        for kind, suffix in (("jpeg", "jpg"), ("png", "png")):
            path = folder / f"img{i:05d}.{suffix}"
            pixels.save(path, quality=90) if kind == "jpeg" else pixels.save(path)
            paths[kind].append(path)
    return paths


def run_mmcl(paths: list[Path], draft: bool) -> float:
    from transformers import ViTImageProcessorPil

    from mmcl.data.augment import Augment
    from mmcl.data.pairs import PairRecipe, make_pair

    processor = ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    recipe = PairRecipe(processor, Augment(scale=(0.9, 1.0), jitter=0.0))
    if not draft:
        object.__setattr__(recipe, "min_size", None)  # the full decode: the "before"
    start = time.perf_counter()
    for i, path in enumerate(paths):
        make_pair(str(path), "a caption", recipe, f"0/0/{i}")
    return len(paths) / (time.perf_counter() - start)


def run_open_clip(paths: list[Path], python: str) -> float:
    done = subprocess.run([python, "-c", OPEN_CLIP, json.dumps([str(p) for p in paths])], capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="the shorter side of the images written")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", default=None, help="a Python with open_clip and torchvision")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one worker's work: decoding, not torch threads
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), args.images, args.size)
        for kind, paths in files.items():
            run_mmcl(paths[:20], True)  # warm the page cache and imports
            for _ in range(args.repeats):
                contestants = {"mmcl": lambda: run_mmcl(paths, True), "mmcl, full decode": lambda: run_mmcl(paths, False)}
                if args.peer_python:
                    contestants["open_clip"] = lambda: run_open_clip(paths, args.peer_python)
                for name, run in contestants.items():
                    results.setdefault(f"{kind} | {name}", []).append(run())
    width = int(args.size * 4 / 3)
    print(f"{args.images} images of {width}x{args.size} px -> 224 px random resized crop, 1 process, 1 thread, "
          f"median of {args.repeats}")
    print(f"| input | pipeline | images/s per core | cores for {H100_VIT_B32:,.0f} samples/s |")
    print("|---|---|---|---|")
    for key, rates in results.items():
        rate = statistics.median(rates)
        kind, name = key.split(" | ")
        print(f"| {kind} | {name} | {rate:.1f} | {H100_VIT_B32 / rate:.1f} |")


if __name__ == "__main__":
    main()
