"""Small ``torch.distributed`` helpers shared by the objectives.

Every helper is a no-op (or the identity) when no default process group is initialised, so the losses run unchanged
in a single process, in tests, and under ``torchrun`` with DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "all_reduce_max", "all_reduce_sum", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default process group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks, in place, and return it (``t`` unchanged when not distributed).

    Not differentiable: use it on statistics computed under ``torch.no_grad()`` (Sinkhorn sums, k-means counts).

    Args:
        t: a tensor of any shape, identical on every rank.
    Returns:
        ``t`` itself, holding the element-wise sum over ranks.
    """
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks, in place, and return it (identity when not distributed)."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class _AllGatherWithGrad(torch.autograd.Function):
    """``cat`` of every rank's tensor along dim 0; backward: sum of all ranks' gradients, own slice returned."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        ctx.batch = t.shape[0]
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, keeping the autograd graph.

    The same semantics as ``torch.distributed.nn.functional.all_gather`` followed by ``torch.cat`` (deprecated in
    recent torch releases, hence this small ``autograd.Function``): the backward pass sums the gradients of the
    gathered tensor over ranks and gives each rank the slice of its own rows, so a loss computed on the gathered tensor
    trains every rank's encoder. Every rank must call it (it is a collective).

    Args:
        t: ``[B, ...]``, the same shape on every rank.
    Returns:
        ``[world_size * B, ...]``, rank-major (rank 0's rows first); ``t`` itself when not distributed.
    """
    if not is_distributed() or world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)
