"""Several examples of one micro-batch at once, each on its own CPU thread.

On a CPU, one unpadded example at a time with torch's threads splitting every op is the simplest
fast path, but each op of a ~200-token example is small, so the threads spend much of their
time waiting for each other. Running k examples side by side, each on 1/k of the threads, keeps
every core on its own work: on this project's 2-core machines 2 examples x 1 thread train
15-20% more tokens/s than 1 example x 2 threads, for one more example's activations in memory.

The training loop calls the loss, then backward on the loss divided by the step's trained-token
count. So the forwards run here, concurrently, and return one loss whose backward runs the
examples' backwards concurrently too (the way reentrant checkpointing calls backward from inside
a backward). Gradients are accumulated deterministically: the first example's backward writes
`.grad` directly, the others return theirs, which are added afterwards in example order, so a
run is reproducible bit for bit (resume relies on it). Models with active dropout run their
examples one after the other (see draws_random_numbers).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from tunesmith.training import interrupt

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_RUNNING = [0]  # examples being computed on worker threads right now
_RUNNING_LOCK = threading.Lock()


def examples_running() -> bool:
    """Whether a worker thread is inside an example. A thread cannot be interrupted mid-example, and
    Python joins ThreadPoolExecutor threads at exit, so an interrupted process would wait for it."""
    return _RUNNING[0] > 0


def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads that keep `torch.get_num_threads() // workers` intra-op threads each (the calling
    thread's own setting is left as it is)."""
    per_worker = max(1, torch.get_num_threads() // workers)
    key = (workers, per_worker)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="tunesmith-example",
                                         initializer=torch.set_num_threads, initargs=(per_worker,))
    return _POOLS[key]


def _in_caller_modes(fn: Callable) -> Callable:
    """Grad mode and CPU autocast are thread-local: run `fn` in a worker under the caller's. A
    worker starts no example once a stop was requested: its KeyboardInterrupt travels through the
    future to the main thread (signals are only ever delivered to the main thread)."""
    grad, autocast = torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def run(*args):
        interrupt.check()
        with _RUNNING_LOCK:
            _RUNNING[0] += 1
        try:
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=autocast):
                return fn(*args)
        finally:
            with _RUNNING_LOCK:
                _RUNNING[0] -= 1
    return run


def has_dropout(model) -> bool:
    """Dropout anywhere (a layer, or attention dropout passed to sdpa as a number)."""
    config = getattr(model, "config", None)
    return getattr(config, "attention_dropout", 0) > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def draws_random_numbers(model) -> bool:
    """Training with dropout: threads would draw from the one global generator in an order that
    varies from run to run, so a run could not be reproduced (or resumed) exactly; such models
    run their examples one after the other."""
    return model.training and has_dropout(model)


def rows_loss_sum_with(loss_fn: Callable, model, rows: list[dict], threads: int) -> tuple[torch.Tensor, int]:
    """sum of loss_fn(model, row) over rows, and of their target counts; `threads` rows at a time."""
    device = next(model.parameters()).device
    rows = [{k: v.to(device) for k, v in r.items()} for r in rows]
    if threads <= 1 or len(rows) == 1 or device.type != "cpu" or draws_random_numbers(model):
        results = []
        for r in rows:
            interrupt.check()
            results.append(loss_fn(model, r))
        return sum(loss for loss, _ in results), sum(n for _, n in results)
    results = list(_pool(threads).map(_in_caller_modes(lambda r: loss_fn(model, r)), rows))
    losses, count = [loss for loss, _ in results], sum(n for _, n in results)
    if not any(loss.requires_grad for loss in losses):
        return sum(loss.detach() for loss in losses), count
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = torch.zeros((), device=device, requires_grad=True)  # makes the sum part of the graph
    return _ConcurrentBackward.apply(anchor, losses, params, threads), count


class _ConcurrentBackward(torch.autograd.Function):
    """Forward: the sum of already computed losses. Backward: their own backwards, concurrently."""

    @staticmethod
    def forward(ctx, anchor, losses, params, threads):
        ctx.losses, ctx.params, ctx.threads = losses, params, threads
        return torch.stack([loss.detach() for loss in losses]).sum()

    @staticmethod
    def backward(ctx, grad):
        losses, params, ctx.losses = ctx.losses, ctx.params, None  # each graph is freed by its backward

        def first(loss):
            torch.autograd.backward(loss, grad)  # into .grad, like the ordinary path
            return None

        def other(loss):
            return torch.autograd.grad(loss, params, grad, allow_unused=True)

        jobs = [_in_caller_modes(first if i == 0 else other) for i in range(len(losses))]
        results = list(_pool(ctx.threads).map(lambda job_loss: job_loss[0](job_loss[1]), zip(jobs, losses)))
        with torch.no_grad():
            for grads in results[1:]:  # in example order: the sum does not depend on thread timing
                for p, g in zip(params, grads):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad += g
        return None, None, None, None
