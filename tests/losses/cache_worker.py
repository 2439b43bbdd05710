"""One training step of a tiny dual encoder with dropout, under `torchrun` (or alone): GradCache
through Accelerate (DDP when there are 2 processes) against a reference that keeps every chunk's
graph, runs plain torch.distributed (no DDP) and averages gradients by hand.

python cache_worker.py OUT.pt GLOBAL_BATCH CHUNK DROPOUT LOSS [slip] [noreplay] [whole]

slip: SLIP's image–image term too (two views per image through the cache). noreplay: a mutation for
the control, the re-run does not replay the first pass's random state. whole: the reference is one
forward of the whole batch instead of the same chunks with their graphs kept.
"""

import copy
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed

import mmcl.losses.cache
from mmcl.losses import ImageSSL, build_loss
from mmcl.config import LossConfig
from mmcl.losses.cache import split_rows
from mmcl.losses.objective import Objective
from mmcl.towers.model import DualEncoder, DualEncoderConfig

TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
VISION = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def tiny_model(dropout: float, bias: float | None, ssl_dim: int | None = None) -> DualEncoder:
    torch.manual_seed(0)
    drop = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return DualEncoder(DualEncoderConfig({**TEXT, **drop}, {**VISION, **drop}, text_pooling="mean",
                                         vision_pooling="cls", projection_dim=8, init_logit_bias=bias,
                                         image_ssl_dim=ssl_dim))


def global_batch(n: int, views: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (n,), generator=g)
    batch = {"input_ids": torch.randint(5, 100, (n, 9), generator=g),
             "attention_mask": (torch.arange(9)[None, :] < lengths[:, None]).long(),
             "pixel_values": torch.randn(n, 3, 16, 16, generator=g),
             # rows 0 and 1 show the same image: twins, masked by the loss
             "image_ids": torch.tensor([7, 7] + list(range(100, 100 + n - 2))),
             "text_ids": torch.arange(n) + 1000,
             "view_pixel_values": torch.randn(2 * n, 3, 16, 16, generator=g)}  # rows 2i, 2i + 1: image i's views
    if not views:
        del batch["view_pixel_values"]
    return batch


def sgd_step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad


def main() -> None:
    out_path, batch_size, chunk, dropout, loss_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    slip, whole = "slip" in sys.argv[6:], "whole" in sys.argv[6:]
    if "noreplay" in sys.argv[6:]:
        mmcl.losses.cache.RngState.restore = lambda self: None
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    local = batch_size // world
    full = global_batch(batch_size, views=True)
    mine = {k: v[rank * local * (2 if k == "view_pixel_values" else 1):(rank + 1) * local * (2 if k == "view_pixel_values" else 1)]
            for k, v in full.items()}
    if not slip:
        del mine["view_pixel_values"]
    cfg = LossConfig(name=loss_name)
    bias = -10.0 if loss_name == "siglip" else None
    reference = tiny_model(dropout, bias, 8 if slip else None).train()
    model = acc.prepare(copy.deepcopy(reference))
    ssl = ImageSSL(0.5, 0.1) if slip else None

    set_seed(5)  # GradCache through Accelerate / DDP
    objective = Objective(build_loss(cfg), acc, cache_chunk=chunk, image_ssl=ssl)
    loss, terms = objective(model, dict(mine))
    acc.backward(loss)
    sgd_step(model)

    set_seed(5)  # the reference: every chunk's graph kept (or the whole batch at once), one backward, gradients averaged by hand
    inputs = {k: mine[k] for k in ("input_ids", "attention_mask", "pixel_values", "view_pixel_values") if k in mine}
    chunks = [inputs] if whole else split_rows(inputs, -(-local // chunk))
    outs = [reference(**c) for c in chunks]
    first = outs[0]
    joined = type(first)(torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                         first.logit_scale, first.logit_bias)
    ref_loss = build_loss(cfg)(joined, image_ids=mine["image_ids"], text_ids=mine["text_ids"])
    if slip:
        ref_loss = ref_loss + ssl(torch.cat([o.view_embeds for o in outs]), mine["image_ids"])
    ref_loss.backward()
    if world > 1:
        for p in reference.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    sgd_step(reference)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        torch.save({"loss": loss.item(), "ref_loss": ref_loss.item(), "terms": {k: v.item() for k, v in terms.items()},
                    "cached": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()},
                    "reference": {k: v.detach().clone() for k, v in reference.state_dict().items()}}, out_path)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
