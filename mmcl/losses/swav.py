"""SwAV's term (Caron et al. 2020): embeddings are assigned to learned prototypes by an
equal-partition Sinkhorn–Knopp step, and each embedding predicts its partner's assignment
("swapped prediction"). No negatives are compared directly; the equal partition is what keeps
every embedding from falling into one prototype.

Two partnerships, each logged as its own term:
- `loss_swav_views`: image i's two augmented views (the image–image head's output, rows 2i and
  2i + 1) predict each other's assignment, over the prototypes `model.prototypes["views"]`;
- `loss_swav_pairs`: an image's assignment predicts its caption's and the caption's predicts the
  image's, over prototypes in the joint embedding space (`model.prototypes["pairs"]`): a clustering
  view of image–text alignment.

The prototypes are the model's parameters (the optimizer, DDP and checkpoints hold them), kept unit
norm at every optimizer step and frozen (zero gradient) for the first `freeze_steps`. Sinkhorn's
sums run over all processes, so N processes compute exactly the assignments one process computes
on the global batch; GradCache gives it the whole batch at once. With `queue_size`, the last rows
(detached, `queue_size` images over all processes) join the Sinkhorn step to steady the assignments at a
small batch; only the batch's own rows are scored. The queue holds every process's rows (gathered,
alike on every process, so a checkpoint from one process keeps it whole) and each process puts its
share of them, rows rank::world, into the partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .distributed import all_reduce, gather_ids, is_distributed

SPACES = ("views", "images", "texts")  # what the queue keeps: the scores' rows of each kind


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments (B, K) of this process's rows of `scores` (B, K: cosine to each prototype)
    such that, over all processes' rows, every prototype receives an equal share and every row sums
    to 1: Sinkhorn–Knopp on exp(scores / epsilon), its row and column sums taken over all processes."""
    logits = scores.double() / epsilon  # float64: at a small epsilon exp() of float32 underflows to 0
    top = all_reduce(logits.max().clone(), dist.ReduceOp.MAX)
    q = torch.exp(logits - top).T  # (K, B); the shift cancels in the normalisation
    prototypes = q.shape[0]
    rows = all_reduce(torch.tensor(float(q.shape[1]), device=q.device, dtype=q.dtype))
    q /= all_reduce(q.sum())
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: 1 / K of the mass
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)  # each row: 1 / B of the mass
        q /= rows
    return (q * rows).T.to(scores.dtype if scores.is_floating_point() else torch.float32)


def swapped(codes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted distribution softmax(`logits`) against the partner's `codes`,
    the mean over rows."""
    return -(codes * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class SwAV(nn.Module):
    """`weight` x each swapped-prediction term. Call `before_step(model)` at the start of every
    micro-batch, then the module on the model and the batch's embeddings. `queue_size` counts
    images over all processes (with their two views and caption)."""

    def __init__(self, weight: float, temperature: float, epsilon: float, iterations: int, freeze_steps: int,
                 queue_size: int, dims: dict[str, int], accumulation_steps: int = 1) -> None:
        super().__init__()
        self.weight, self.temperature, self.epsilon, self.iterations = weight, temperature, epsilon, iterations
        self.freeze_steps, self.accumulation_steps = freeze_steps, accumulation_steps
        for space, rows in zip(SPACES, (2 * queue_size, queue_size, queue_size)):
            self.register_buffer(f"queue_{space}", torch.zeros(rows, dims[space]))
        self.register_buffer("filled", torch.zeros(len(SPACES), dtype=torch.long))  # queue rows in use
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def step(self) -> int:
        """The optimizer step the current micro-batch belongs to."""
        return (int(self.calls) - 1) // self.accumulation_steps

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        """Prototypes back to unit norm, on the first micro-batch of each optimizer step."""
        if int(self.calls) % self.accumulation_steps == 0:
            for layer in prototypes_of(model).values():
                layer.weight.copy_(F.normalize(layer.weight, dim=-1))
        self.calls += 1

    def forward(self, model: nn.Module, views: torch.Tensor | None, images: torch.Tensor,
                texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms on this process's rows (`views`: (2B, D_ssl), rows 2i and 2i + 1 image i's;
        `images`, `texts`: (B, D), row i a pair), all unit norm."""
        layers = prototypes_of(model)
        frozen = self.step() < self.freeze_steps
        terms = {}
        if views is not None:
            scores = self.scores(layers["views"], views, frozen)
            codes = self.assign(layers["views"], scores, "views", views)
            partner = torch.arange(len(views), device=views.device) ^ 1
            terms["loss_swav_views"] = self.weight * swapped(codes[partner], scores / self.temperature)
        image_scores = self.scores(layers["pairs"], images, frozen)
        text_scores = self.scores(layers["pairs"], texts, frozen)
        image_codes = self.assign(layers["pairs"], image_scores, "images", images)
        text_codes = self.assign(layers["pairs"], text_scores, "texts", texts)
        terms["loss_swav_pairs"] = self.weight * (swapped(image_codes, text_scores / self.temperature)
                                                  + swapped(text_codes, image_scores / self.temperature)) / 2
        return terms

    @staticmethod
    def scores(layer: nn.Linear, embeds: torch.Tensor, frozen: bool) -> torch.Tensor:
        """Cosine of each row to each prototype, (B, K); while frozen the prototypes get a zero
        gradient (not none: DDP expects every parameter's gradient at every step)."""
        weight = layer.weight.detach() + 0.0 * layer.weight if frozen else layer.weight
        return embeds.float() @ weight.float().T

    @torch.no_grad()
    def assign(self, layer: nn.Linear, scores: torch.Tensor, space: str, embeds: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes of this batch's rows, with the queue's rows (scored by the prototypes as
        they are now) in the partition; then the batch's rows join the queue, newest first."""
        queue: torch.Tensor = getattr(self, f"queue_{space}")
        if not len(queue):
            return sinkhorn(scores, self.epsilon, self.iterations)
        index = SPACES.index(space)
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        held = queue[:int(self.filled[index])][rank::world]  # this process's share of the partition
        codes = sinkhorn(torch.cat([scores, held @ layer.weight.float().T]), self.epsilon, self.iterations)
        every = gather_ids(embeds.float())  # all processes' rows, in rank order
        if torch.isfinite(every).all():  # a bad step's rows would make every later code NaN
            queue.copy_(torch.cat([every, queue])[:len(queue)])
            self.filled[index] = min(len(queue), int(self.filled[index]) + len(every))
        return codes[:len(embeds)]

    @staticmethod
    def parameters_of(model: nn.Module) -> list[nn.Parameter]:
        """The parameters the term runs itself (the prototypes), for GradCache."""
        return list(prototypes_of(model).parameters())


def prototypes_of(model: nn.Module) -> nn.ModuleDict:
    return extract_model_from_parallel(model).training_head("prototypes")
