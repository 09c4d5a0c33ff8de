"""Collectives for losses over the global batch. Each takes the process group; ``None`` means
a single process, where every function is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

Group = dist.ProcessGroup | None


def rank_and_world(group: Group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends every rank's gradient for a slice back to the
    rank that owns it (summed), so that the global loss is differentiated exactly."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(grad.chunk(ctx.world)[0])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad.chunk(ctx.world)[ctx.rank], None


def gather_with_grad(tensor: Tensor, group: Group) -> Tensor:
    """(B, ...) on each rank -> (world * B, ...), rank order; gradients flow back to the owner.
    Every rank must hold the same B."""
    if rank_and_world(group)[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def gather(tensor: Tensor, group: Group) -> Tensor:
    """All-gather without gradient (token ids, masks, image ids)."""
    _, world = rank_and_world(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def global_mean(total: Tensor, count: Tensor, group: Group) -> Tensor:
    """A mean over the global batch that averaging over ranks (as DDP does with gradients)
    turns into the exact global mean: ``total * world / sum of counts``. No host sync."""
    _, world = rank_and_world(group)
    count = count.detach().to(total.dtype)
    if world > 1:
        count = count.clone()
        dist.all_reduce(count, group=group)
    return total * world / count.clamp(min=1)
