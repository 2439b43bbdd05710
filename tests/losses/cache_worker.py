"""One training step of a tiny dual encoder with dropout, under `torchrun` (or alone): GradCache
through Accelerate (DDP when there are 2 processes) against a reference that keeps every chunk's
graph, runs plain torch.distributed (no DDP) and averages gradients by hand.

python cache_worker.py OUT.pt GLOBAL_BATCH CHUNK DROPOUT LOSS
"""

import copy
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed

from mmcl.losses import build_loss
from mmcl.config import LossConfig
from mmcl.losses.objective import Objective, split_rows
from mmcl.towers.model import DualEncoder, DualEncoderConfig

TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
VISION = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def tiny_model(dropout: float, bias: float | None) -> DualEncoder:
    torch.manual_seed(0)
    drop = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return DualEncoder(DualEncoderConfig({**TEXT, **drop}, {**VISION, **drop}, text_pooling="mean",
                                         vision_pooling="cls", projection_dim=8, init_logit_bias=bias))


def global_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (n,), generator=g)
    return {"input_ids": torch.randint(5, 100, (n, 9), generator=g),
            "attention_mask": (torch.arange(9)[None, :] < lengths[:, None]).long(),
            "pixel_values": torch.randn(n, 3, 16, 16, generator=g),
            # rows 0 and 1 show the same image: twins, masked by the loss
            "image_ids": torch.tensor([7, 7] + list(range(100, 100 + n - 2))),
            "text_ids": torch.arange(n) + 1000}


def sgd_step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad


def main() -> None:
    out_path, batch_size, chunk, dropout, loss_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    local = batch_size // world
    full = global_batch(batch_size)
    mine = {k: v[rank * local:(rank + 1) * local] for k, v in full.items()}
    cfg = LossConfig(name=loss_name)
    bias = -10.0 if loss_name == "siglip" else None
    reference = tiny_model(dropout, bias).train()
    model = acc.prepare(copy.deepcopy(reference))

    set_seed(5)  # GradCache through Accelerate / DDP
    objective = Objective(build_loss(cfg), acc, cache_chunk=chunk)
    loss = objective(model, dict(mine))
    acc.backward(loss)
    sgd_step(model)

    set_seed(5)  # the reference: every chunk's graph kept, one backward, gradients averaged by hand
    chunks = split_rows({k: mine[k] for k in ("input_ids", "attention_mask", "pixel_values")}, -(-local // chunk))
    outs = [reference(**c) for c in chunks]
    first = outs[0]
    joined = type(first)(torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                         first.logit_scale, first.logit_bias)
    ref_loss = build_loss(cfg)(joined, image_ids=mine["image_ids"], text_ids=mine["text_ids"])
    ref_loss.backward()
    if world > 1:
        for p in reference.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    sgd_step(reference)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        torch.save({"loss": loss.item(), "ref_loss": ref_loss.item(),
                    "cached": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()},
                    "reference": {k: v.detach().clone() for k, v in reference.state_dict().items()}}, out_path)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
