"""Data parallelism: what changes when several processes train one model.

Each rank runs its own micro-batches; the step's loss stays the mean over all trained tokens of
all ranks: every rank divides its summed loss by the global token count, and gradients are
summed (not averaged) across ranks. Averaging per-rank means instead would over-weight ranks that
happened to get short examples.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_count(n: int) -> int:
    if world()[1] == 1:
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient across ranks, in one flat buffer (one collective per step)."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def sum_scalar(x: float) -> float:
    if world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())
