"""Input-pipeline throughput: mmcl's training data path against a plain single-process loop.

Run:  python scripts/bench_data.py [--images 2000] [--size 320] [--workers 2] [--batch 64]
Writes N JPEG photos-like images (smooth gradients + noise, `--size` px) and a metadata.csv to a
temporary folder, then measures images/s of
  mmcl:     PairDataset + PairCollator in a torch DataLoader with `--workers` worker processes
            (lazy decode, RGB conversion, image processor, tokenization, duplicate ids);
  baseline: a plain loop in one process: PIL.Image.open -> convert("RGB") -> image processor.
Both use the same image processor (resize to 224, normalise). Runs alternate, median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = np.stack([xx * rng.uniform(0, 255), yy * rng.uniform(0, 255), (xx + yy) * rng.uniform(0, 127)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    (folder / "metadata.csv").write_text("file_name,caption\n" + "\n".join(f"{p.name},image number {i}"
                                                                          for i, p in enumerate(paths)))
    return paths


def run_mmcl(folder: Path, processor, workers: int, batch: int) -> float:
    import torch

    from mmcl.towers.build import train_tokenizer
    from mmcl.config import SourceSpec
    from mmcl.data.pairs import PairCollator, PairDataset, PairRecipe
    from mmcl.data.sources import load_pairs

    ds = load_pairs(SourceSpec(str(folder)))
    tokenizer = train_tokenizer(["image number 0 1 2 3 4 5 6 7 8 9"], 100)
    loader = torch.utils.data.DataLoader(PairDataset(ds, "image", "caption", PairRecipe(processor)), batch_size=batch,
                                         num_workers=workers, collate_fn=PairCollator(tokenizer, 16))
    start, count = time.perf_counter(), 0
    for b in loader:
        count += b["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def run_baseline(paths: list[Path], processor) -> float:
    start = time.perf_counter()
    for path in paths:
        processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch
    from transformers import ViTImageProcessorPil

    torch.set_num_threads(1)  # decoding is the work; keep torch from oversubscribing the cores
    processor = ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, args.size)
        run_baseline(paths[:50], processor)  # warm the page cache and imports for both
        mmcl, base = [], []
        for _ in range(args.repeats):
            mmcl.append(run_mmcl(Path(tmp), processor, args.workers, args.batch))
            base.append(run_baseline(paths, processor))
    m, b = statistics.median(mmcl), statistics.median(base)
    print(f"{args.images} JPEGs of {args.size}px -> 224px, batch {args.batch}, repeats {args.repeats} (median)")
    print(f"mmcl pipeline ({args.workers} workers): {m:8.1f} images/s")
    print(f"plain loop (1 process):      {b:8.1f} images/s")
    print(f"ratio mmcl / plain: {m / b:.2f}")


if __name__ == "__main__":
    main()
