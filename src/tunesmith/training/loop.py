"""The optimisation loop shared by recipes: accumulation, normalisation, clipping, schedule, logging."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tunesmith.data.batching import collate, epoch_batches, trained_targets
from tunesmith.data.pack import PackedRow
from tunesmith.data.tokenize import Encoded
from tunesmith.training.logging import MetricsLogger

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
Items = list[Encoded] | list[PackedRow]  # examples, or packed rows of examples (data.packing)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    trained_tokens: int
    final_loss: float
    val_loss: float | None
    seconds: float


def total_steps(n_examples: int, tcfg) -> int:
    if tcfg.max_steps:
        return tcfg.max_steps
    per_epoch = math.ceil(n_examples / tcfg.batch_size)
    return max(1, math.ceil(tcfg.epochs * per_epoch / tcfg.grad_accum))


def make_optimizer(model, tcfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen weights get no state
    try:
        return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, foreach=True)


def make_scheduler(optimizer, tcfg, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(tcfg.schedule, tcfg.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=steps)


def micro_batches(examples: Items, tcfg) -> Iterator[Items]:
    """Endless stream of micro-batches, epoch after epoch, each epoch reshuffled by seed."""
    epoch = 0
    while True:
        for idx in epoch_batches(examples, tcfg.batch_size, tcfg.seed, epoch):
            yield [examples[i] for i in idx]
        epoch += 1


@torch.no_grad()
def evaluate_loss(model, examples: Items, loss_fn: LossFn, pad_id: int, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss_sum, n = loss_fn(model, collate(examples[start:start + batch_size], pad_id))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(model, examples: Items, tcfg, loss_fn: LossFn, pad_id: int, logger: MetricsLogger,
          val_examples: Items | None = None) -> TrainResult:
    steps = logger.total_steps
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, steps)
    stream = micro_batches(examples, tcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss_value, val_loss = float("nan"), None
    for step in range(1, steps + 1):
        groups = [next(stream) for _ in range(tcfg.grad_accum)]
        batches = [collate(group, pad_id) for group in groups]
        # The step's loss is the mean over all its trained tokens: each micro-batch's summed loss
        # is divided by the step total, so accumulation never re-weights short vs long batches.
        n_step = sum(trained_targets(b["labels"]) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss_sum, _ = loss_fn(model, batch)
            (loss_sum / n_step).backward()
            step_loss += loss_sum.item()
        if tcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = step_loss / n_step
        logger.count(sum(len(e.input_ids) for group in groups for e in group), n_step)  # no padding
        if step % tcfg.log_every == 0 or step == steps:
            logger.progress(step, loss_value, lr)
        if val_examples and (step == steps or (tcfg.eval_every and step % tcfg.eval_every == 0)):
            val_loss = evaluate_loss(model, val_examples, loss_fn, pad_id, tcfg.batch_size)
            logger.log(step, val_loss=round(val_loss, 6))
            print(f"step {step:>5}/{steps}  validation loss {val_loss:.4f}", flush=True)
    seconds = time.perf_counter() - logger.start
    return TrainResult(steps, logger.tokens, logger.trained_tokens, loss_value, val_loss, seconds)
