"""Per-process memory of mmcl's contrastive loss at a large global batch, for several process
counts: what one rank of an N-process job holds while computing ClipLoss (local loss: its B/N
rows against all B gathered columns, both directions) and its backward.

Run:  python scripts/bench_local_loss.py [--global-batch 32768] [--dim 512] [--ranks 8 32 128]
Each point runs in its own process on the CPU, as rank 0 of N: the gathered embeddings of the
other ranks are random unit rows standing in for `all_gather`'s output (with gradient, as in a
real job). Memory: peak resident memory of forward + backward above the resident memory just
before it, the embeddings already allocated (Linux: /proc/self/clear_refs resets the peak).
Also printed: the size of one (B/N, B) fp32 logits matrix, the unit the peak is made of.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_loss import _kib  # noqa: E402  (peak-RSS reading, shared with the GradCache benchmark)


def worker(global_batch: int, ranks: int, dim: int) -> dict[str, float]:
    from mmcl.losses import clip
    from mmcl.towers.model import DualEncoderOutput

    local = global_batch // ranks
    g = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    images, texts = unit(local).requires_grad_(), unit(local).requires_grad_()
    others = {id(images): unit(global_batch - local), id(texts): unit(global_batch - local)}
    # rank 0's rows first, then the others': what gather_with_grad returns on rank 0
    clip.gather_with_grad = lambda x: (torch.cat([x, others[id(x)]]), 0)
    scale = torch.tensor([2.6593], requires_grad=True)
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    loss = clip.ClipLoss()(DualEncoderOutput(images, texts, scale))
    loss.backward()
    return {"global_batch": global_batch, "ranks": ranks, "rows_per_rank": local,
            "logits_matrix_mb": local * global_batch * 4 / 2**20, "peak_mb": (_kib("VmHWM") - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.global_batch, args.worker, args.dim)))
        return
    for ranks in args.ranks:
        cmd = [sys.executable, __file__, "--worker", str(ranks), "--global-batch", str(args.global_batch),
               "--dim", str(args.dim)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
