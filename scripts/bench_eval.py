"""Retrieval-metric cost: `mmcl.evaluation.metrics.retrieval_metrics` (chunked, no similarity matrix, no sort)
against the naive full-matrix way open_clip computes it (`logits = image_embeds @ text_embeds.T`,
then a full `argsort` per direction), on the same synthetic embeddings.

Run:  python scripts/bench_eval.py [--images 10000] [--captions-per-image 5] [--dim 256] [--repeats 1]
          [--chunk-size 1024] [--threads 2] [--json results.json]
Measures, per implementation: wall time of the metric computation alone (data generation and a tiny
warm-up call excluded; median over repeats) and peak RSS (ru_maxrss), both absolute and as the
increment over the RSS right after the inputs were created (the high-water mark is reset there,
via /proc/self/clear_refs, so data generation does not count). Each implementation runs in its own
process, so its peak is its own; repeats alternate the order. Also checks that both give the same
Recall@1/5/10 in both directions (exit status 1 if any differs by more than 1e-6).

Data (fixed seed, float32): random unit image embeddings; each caption is its image's embedding
plus Gaussian noise (`--noise`), re-normalised, so recalls are mid-range and the agreement check
means something (with independent random captions every recall would be ~0). `--noise inf` gives
captions independent of their images. The cost of either implementation does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

KS = (1, 5, 10)
IMPLS = ("mmcl", "naive")


def make_inputs(n_img: int, per_image: int, dim: int, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N_img, D) unit images, (N_img * per_image, D) unit captions and their (N_txt,) image index."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    text_to_image = torch.arange(n_img).repeat_interleave(per_image)  # (N_txt,) captions grouped by image
    noise_vec = torch.randn(n_img * per_image, dim, generator=g) / math.sqrt(dim)  # norm ~1
    texts = noise_vec if math.isinf(noise) else images[text_to_image] + noise * noise_vec
    return images, torch.nn.functional.normalize(texts, dim=1), text_to_image


def naive_retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                           ks: tuple[int, ...] = KS) -> dict[str, float]:
    """open_clip's `get_clip_metrics`, extended to several captions per image.

    Builds the full (N_img, N_txt) logits and argsorts each direction. Image -> text takes, per
    image, the best (smallest) position among its own captions, as mmcl does.
    """
    n_img = image_embeds.shape[0]
    logits = image_embeds @ text_embeds.T  # (N_img, N_txt), 4 bytes each
    out = {}

    ranking = torch.argsort(logits, dim=1, descending=True)  # (N_img, N_txt) int64
    # image of each ranked caption, (N_img, N_txt) int64, vs the query image: where its own captions sit
    rows, positions = torch.where(text_to_image[ranking] == torch.arange(n_img)[:, None])  # 0-based
    best = torch.full((n_img,), logits.shape[1], dtype=torch.long).scatter_reduce_(0, rows, positions, reduce="amin")
    out.update({f"image_to_text_R@{k}": float((best < k).double().mean()) for k in ks})
    del ranking, rows, positions, best  # free ~4 GB before the second sort (at the default size)

    ranking = torch.argsort(logits.T, dim=1, descending=True)  # (N_txt, N_img) int64
    preds = torch.where(ranking == text_to_image[:, None])[1]  # (N_txt,) 0-based position of the target
    out.update({f"text_to_image_R@{k}": float((preds < k).double().mean()) for k in ks})
    return out


def mmcl_retrieval_recall(chunk_size: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]:
    from mmcl.evaluation.metrics import retrieval_metrics

    def run(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
        out = retrieval_metrics(images, texts, text_to_image, ks=KS, chunk_size=chunk_size)
        return {k: v for k, v in out.items() if "_R@" in k}
    return run


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (and so ru_maxrss) to its current RSS (Linux >= 4.0).

    Without it, temporaries of data generation would count in the peak of a metric that uses less.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    fn = mmcl_retrieval_recall(args.chunk_size) if impl == "mmcl" else naive_retrieval_recall
    images, texts, text_to_image = make_inputs(args.images, args.captions_per_image, args.dim, args.noise)
    small = 64 * args.captions_per_image  # warm-up on a tiny slice: thread pools and kernels, not memory
    fn(images[:64], texts[:small], text_to_image[:small])
    peak_was_reset = reset_peak_rss()
    inputs_mb = current_rss_mb()
    start = time.perf_counter()
    metrics = fn(images, texts, text_to_image)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "inputs_rss_mb": inputs_mb,
            "increment_mb": peak_mb - inputs_mb,
            "peak_was_reset": peak_was_reset, "metrics": metrics}


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--images", str(args.images), "--captions-per-image",
           str(args.captions_per_image), "--dim", str(args.dim), "--chunk-size", str(args.chunk_size),
           "--threads", str(args.threads), "--noise", str(args.noise)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{impl} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = {impl: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb", "increment_mb")}
           for impl, rs in runs.items()}
    metrics = {impl: rs[0]["metrics"] for impl, rs in runs.items()}
    # every repeat must reproduce its first run exactly (deterministic inputs and math)
    stable = all(r["metrics"] == metrics[impl] for impl, rs in runs.items() for r in rs)
    diff = max(abs(metrics["mmcl"][k] - metrics["naive"][k]) for k in metrics["mmcl"])
    return {"runs": runs, "median": med, "metrics": metrics, "max_abs_diff": diff, "agree": diff <= 1e-6 and stable,
            "repeat_stable": stable,
            "ratios": {"naive_over_mmcl_seconds": med["naive"]["seconds"] / med["mmcl"]["seconds"],
                       "naive_over_mmcl_increment": med["naive"]["increment_mb"] / max(med["mmcl"]["increment_mb"], 1.0)}}


def print_report(args: argparse.Namespace, summary: dict) -> None:
    n_txt = args.images * args.captions_per_image
    print(f"{args.images} images x {n_txt} captions, dim={args.dim}, chunk_size={args.chunk_size}, "
          f"threads={args.threads}, noise={args.noise}, repeats={args.repeats} (median of repeats)")
    print(f"{'implementation':<16}{'seconds':>10}{'peak RSS MB':>14}{'increment MB':>15}")
    for impl in IMPLS:
        m = summary["median"][impl]
        print(f"{impl:<16}{m['seconds']:>10.2f}{m['peak_rss_mb']:>14.0f}{m['increment_mb']:>15.0f}")
    r = summary["ratios"]
    print(f"naive / mmcl: time {r['naive_over_mmcl_seconds']:.2f}x, memory increment {r['naive_over_mmcl_increment']:.1f}x"
          " (mmcl increment floored at 1 MB)")
    print(f"\n{'metric':<22}{'mmcl':>10}{'naive':>10}")
    for key, value in summary["metrics"]["mmcl"].items():
        print(f"{key:<22}{value:>10.5f}{summary['metrics']['naive'][key]:>10.5f}")
    if not all(r["peak_was_reset"] for rs in summary["runs"].values() for r in rs):
        print("note: could not reset the RSS high-water mark; peaks may include data generation")
    verdict = "agree" if summary["agree"] else "DISAGREE"
    print(f"max |diff| = {summary['max_abs_diff']:.2e}: {verdict}"
          + ("" if summary["repeat_stable"] else " (metrics changed between repeats)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024, help="mmcl's chunk_size (its default: 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per implementation, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    parser.add_argument("--noise", type=float, default=5.0, help="caption = image + noise * N(0, I/D); inf: independent")
    parser.add_argument("--json", metavar="PATH", help="also write the runs and summary here")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for rep in range(args.repeats):
        for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:  # alternate who goes first
            runs[impl].append(run_worker(impl, args))
    summary = summarize(runs)
    print_report(args, summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
                       **summary}, f, indent=2)
    if not summary["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
