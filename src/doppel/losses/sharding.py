"""A classifier whose class dimension is split across processes (``classifier.sharded=true``).

Process r of W holds the weight rows of classes [lo_r, hi_r) (contiguous, sizes differing by at most one:
arcface_torch's split). A step all-gathers the embeddings and labels of the global batch, every process
computes the logits of its classes for every row, and the softmax cross-entropy is assembled exactly from
an all-reduce of each row's maximum and of its sum of exponentials (:func:`sharded_cross_entropy`).

Gradients under DDP. The loss has the same value on every process. DDP averages the gradients of the
replicated parameters (backbone, a trainable scale) over the W processes, whereas each process's part of
them covers only its own classes; so the replicated inputs of the sharded computation pass through
:func:`times_world` (identity forward, gradient x W) and :func:`gather_rows` returns to each process the
sum over processes of the gradient of its own rows. A shard's rows get the exact gradient of the loss and
are not touched by DDP (they are registered as ignored). The result equals the unsharded loss's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from doppel.distributed import rank, world


@dataclass(frozen=True)
class ClassShard:
    """Process ``rank``'s classes [lo, hi) of ``num_classes`` split over ``world_size`` processes."""

    num_classes: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_classes < self.world_size:
            raise ValueError(f"classifier.sharded=true splits {self.num_classes} classes over {self.world_size} "
                             "processes: every process needs at least one class; use fewer processes or "
                             "classifier.sharded=false.")

    @staticmethod
    def bounds(num_classes: int, world_size: int) -> list[int]:
        """lo of every process, then num_classes: the first ``num_classes % world_size`` take one more."""
        base, extra = divmod(num_classes, world_size)
        edges = [0]
        for r in range(world_size):
            edges.append(edges[-1] + base + (r < extra))
        return edges

    @cached_property
    def lo(self) -> int:
        return self.bounds(self.num_classes, self.world_size)[self.rank]

    @cached_property
    def hi(self) -> int:
        return self.bounds(self.num_classes, self.world_size)[self.rank + 1]

    def classes(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.lo, self.hi, device=device)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label's column in this shard, -1 where another process holds it."""
        local = labels - self.lo
        return torch.where((local >= 0) & (labels < self.hi), local, torch.full_like(local, -1))


class _TimesWorld(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * world()


def times_world(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` unchanged, its gradient times the world size (DDP then averages it back to the sum)."""
    return _TimesWorld.apply(tensor)


def _all_gather(rows: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(rows) for _ in range(world())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        ctx.count = len(rows)
        return _all_gather(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            own = grad.new_empty(ctx.count, *grad.shape[1:])
            dist.reduce_scatter_tensor(own, grad)
            return own
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank() * ctx.count:(rank() + 1) * ctx.count]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, in rank order (each process must hold as many); the gradient of a
    process's rows is the sum of every process's gradient of them. Without grad for integer tensors."""
    return _GatherRows.apply(rows) if rows.is_floating_point() else _all_gather(rows)


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.detach()
        maximum = logits.max(dim=1).values
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX)
        exp = (logits - maximum[:, None]).exp_()
        total = exp.sum(dim=1)
        held = targets >= 0
        columns = targets.clamp_min(0)[:, None]
        target_logit = torch.where(held, logits.gather(1, columns).squeeze(1), 0.0)
        # One all-reduce for both sums: every row's target is held by exactly one process.
        sums = torch.stack([total, target_logit])
        dist.all_reduce(sums)
        total, target_logit = sums
        exp /= total[:, None]  # this shard's softmax, kept for backward
        ctx.save_for_backward(exp, columns, held)
        return (total.log() + maximum - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, columns, held = ctx.saved_tensors
        grad_logits = softmax.scatter_add(1, columns, -held.to(softmax.dtype)[:, None])  # minus one at held targets
        return grad_logits * (grad / len(softmax)), None


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of the global batch whose classes are split over the processes: ``logits``
    [B, C_r] of this process's classes for every row, ``targets`` [B] the row's class column here or -1.
    Equal on every process to ``F.cross_entropy`` over the concatenated logits; the gradient returned is
    that of this process's columns."""
    return _ShardedCrossEntropy.apply(logits, targets)


def gather_classes(local: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The whole [num_classes, ...] tensor on process 0 from every process's shard rows (None elsewhere);
    collective: every process calls it."""
    size = world()
    edges = ClassShard.bounds(num_classes, size)
    widest = max(b - a for a, b in zip(edges, edges[1:]))
    padded = local.new_zeros(widest, *local.shape[1:])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)] if rank() == 0 else None
    dist.gather(padded.contiguous(), parts, dst=0)
    if rank() != 0:
        return None
    return torch.cat([part[:b - a] for part, a, b in zip(parts, edges, edges[1:])])
