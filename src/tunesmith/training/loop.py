"""The optimisation loop shared by recipes: accumulation, normalisation, clipping, schedule,
evaluation, early stopping, checkpoints and exact resume, guards, logging."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from tunesmith.data.batching import collate, epoch_batches, trained_targets
from tunesmith.data.pack import PackedRow
from tunesmith.data.tokenize import Encoded
from tunesmith.errors import TunesmithError
from tunesmith.training.checkpoint import TrainState, checkpoint_dirs
from tunesmith.training.device import Placement, choose_placement, peak_memory, reset_peak_memory
from tunesmith.training import interrupt
from tunesmith.training.distributed import global_count, sum_scalar, world
from tunesmith.training.distributed.strategy import Strategy
from tunesmith.training.logging import MetricsLogger

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
Items = list[Encoded] | list[PackedRow]  # examples, or packed rows of examples (data.packing)


class TrainingDiverged(TunesmithError):
    pass


@dataclass
class TrainResult:
    steps: int
    tokens: int
    trained_tokens: int
    final_loss: float
    val_loss: float | None
    seconds: float
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    resumed_tokens: int = 0  # tokens trained before this process (by the run it resumed)
    state_bytes: dict | None = None  # this rank's weights and optimizer state, in bytes (see held_bytes)
    peak_memory: tuple[int, str] | None = None  # this rank's peak memory during training, and what measured it

    @property
    def tokens_per_s(self) -> float:
        """This process's speed: the tokens of its own steps over its own seconds (a resumed run's
        earlier tokens were trained in another process's time)."""
        return (self.tokens - self.resumed_tokens) / max(self.seconds, 1e-9)


def total_steps(n_examples: int, tcfg) -> int:
    if tcfg.max_steps:
        return tcfg.max_steps
    per_epoch = math.ceil(n_examples / tcfg.batch_size)
    return max(1, math.ceil(tcfg.epochs * per_epoch / tcfg.grad_accum))


def make_scheduler(optimizer, tcfg, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(tcfg.schedule, tcfg.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=steps)


def micro_batches(examples: Items, tcfg, skip: int = 0) -> Iterator[Items]:
    """Endless stream of micro-batches, epoch after epoch, each epoch reshuffled by seed. `skip`
    resumes at a data position: the order is a pure function of (seed, epoch), so skipping
    reproduces exactly the batches an uninterrupted run would see next."""
    epoch, n = 0, 0
    while True:
        for idx in epoch_batches(examples, tcfg.batch_size, tcfg.seed, epoch):
            if n >= skip:
                yield [examples[i] for i in idx]
            n += 1
        epoch += 1


def loss_units(batch: dict) -> int:
    """What the step's loss averages over: trained tokens (SFT), or what the batch says it holds
    (`units`, e.g. preference pairs, whose loss is a mean over pairs)."""
    return int(batch["units"]) if "units" in batch else trained_targets(batch["labels"])


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def accumulate(model, batches: list[dict], loss_fn: LossFn, placement: Placement,
               scaler: torch.amp.GradScaler | None = None, strategy: Strategy | None = None,
               counted: int | None = None) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches (this rank's share); returns
    (mean loss, trained targets) of the whole step, all ranks together.

    The step's loss is the mean over all its trained tokens: each micro-batch's summed loss is
    divided by the step total (counted across ranks), so neither accumulation nor data
    parallelism re-weights short vs long batches; the strategy sums gradients over ranks during
    the last micro-batch's backward. With a `scaler` (fp16) the gradients come out multiplied by
    its scale; the caller unscales them. `counted`: how many of the batches are this rank's
    (default all); the rest are fillers weighted zero, run so that every rank makes as many
    forwards as the others (a sharded model gathers its weights in each one)."""
    strategy = strategy or _ONE_PROCESS
    counted = len(batches) if counted is None else counted
    n_step = global_count(sum(loss_units(b) for b in batches[:counted]))
    total = 0.0
    for i, batch in enumerate(batches):
        interrupt.check()
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else strategy.no_sync(model):  # exchange gradients once a step
            with placement.autocast():
                loss_sum, _ = loss_fn(model, to_device(batch, placement.device))
            if i >= counted:
                loss_sum = loss_sum * 0.0
            loss = loss_sum / max(n_step, 1)
            strategy.backward(model, scaler.scale(loss) if scaler is not None else loss)
        total += loss_sum.item()
    return sum_scalar(total) / max(n_step, 1), n_step


def rank_share(items: list, rank: int, size: int) -> list:
    """This rank's contiguous part of a step's examples (sizes differ by at most one)."""
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (rank < extra)]


def call_module(module, batch: dict):
    """loss_fn for a strategy's module, which holds the model and its loss (LossModule)."""
    return module(batch)


@torch.no_grad()
def evaluate_loss(model, examples: Items, loss_fn: LossFn, pad_id: int, batch_size: int,
                  placement: Placement | None = None) -> float:
    """Mean loss per trained token over `examples`; several ranks score a batch each in turn and
    add up (every example scored once)."""
    placement = placement or choose_placement("fp32")
    rank, size = world()
    starts = list(range(0, len(examples), batch_size))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for turn in range(math.ceil(len(starts) / size)):
        interrupt.check()
        i = turn * size + rank
        mine = i < len(starts)
        # a rank without a batch this turn still runs one (uncounted) forward: a sharded model
        # gathers its weights in every forward, and every rank must take part
        chunk = examples[starts[i]:starts[i] + batch_size] if mine else examples[:1]
        with placement.autocast():
            loss_sum, n = loss_fn(model, to_device(collate(chunk, pad_id), placement.device))
        if mine:
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return sum_scalar(total) / max(global_count(count), 1)


class LossWatch:
    """Stops on a non-finite loss; warns on a spike above `factor` x the recent mean."""

    def __init__(self, factor: float | None, window: int = 20):
        """factor None: only non-finite losses stop training (a loss that is no quality measure:
        online RL's is about 0 whatever the policy, so ratios to its mean mean nothing)."""
        self.factor, self.window, self.recent = factor, window, []

    def check(self, step: int, loss: float, last_good: Callable[[], Path | None]) -> bool:
        if not math.isfinite(loss):
            last_good = last_good()
            where = f"the last good checkpoint is {last_good}; resume from it with --resume after lowering " \
                    "train.lr" if last_good else "no checkpoint was saved (set train.save_every)"
            raise TrainingDiverged(f"step {step}: the loss is {loss}; training stopped ({where})")
        spike = (self.factor is not None and len(self.recent) >= 5
                 and loss > self.factor * (sum(self.recent) / len(self.recent)))
        if spike:
            print(f"warning: step {step}: loss {loss:.4f} is over {self.factor:g}x the recent mean "
                  f"{sum(self.recent) / len(self.recent):.4f}", flush=True)
        self.recent = (self.recent + [loss])[-self.window:]
        return spike


class EarlyStopping:
    def __init__(self, patience: int, best: float | None = None, best_step: int | None = None, bad: int = 0):
        self.patience, self.best, self.best_step, self.bad = patience, best, best_step, bad

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is a new best."""
        if self.best is None or value < self.best:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


def train(model, examples: Items, tcfg, loss_fn: LossFn, pad_id: int, logger: MetricsLogger,
          val_examples: Items | None = None, run_dir: Path | None = None, resume: Path | None = None,
          placement: Placement | None = None, evaluator: Callable[[int], dict] | None = None,
          collate_fn: Callable = collate, per_forward: int | None = None,
          strategy: Strategy | None = None, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """`evaluator(step)` returns validation metrics; `select` (else `val_loss`), lower is better,
    drives early stopping and the best checkpoint; by default the loss of loss_fn over val_examples.
    A loss_fn with a `pop_metrics()` method adds its own per-step metrics (e.g. preference rewards)
    to the log; one with `step_tokens()` says how many tokens the step processed, all ranks
    together (online RL: the completions are sampled during the step). `per_forward`: cut each step's examples (drawn as tcfg's batches, so a step holds
    the same examples whatever it is cut into) into forwards of this many.

    Under several processes (`strategy`), train.batch_size x train.grad_accum stays the step's
    batch: every rank draws the same step and trains its own contiguous share of it, so N ranks
    take the steps, see the examples in the order and log the losses of one process.

    `on_step(step)` is called before each step's batches are made (online RL seeds its sampling
    with the step, so a resumed run samples what the uninterrupted one would have)."""
    steps = logger.total_steps
    placement = placement or choose_placement(tcfg.precision)
    reset_peak_memory(placement.device)  # what the plan's memory estimate is checked against
    strategy = strategy or Strategy(placement, None)
    module = strategy.prepare(model, loss_fn)  # the model with its loss, wrapped for the strategy
    optimizer = strategy.make_optimizer(module, tcfg)  # frozen weights get no optimizer state
    scheduler = make_scheduler(optimizer, tcfg, steps)
    scaler = placement.grad_scaler()
    state = TrainState(0, 0, 0, 0)
    if resume is not None:
        state = strategy.load_checkpoint(resume, module, optimizer, scheduler, scaler)
        logger.resume_at(state.step, state.tokens, state.trained_tokens)
        print(f"resumed from {resume} (step {state.step})", flush=True)
    ckpt_root = run_dir / "checkpoints" if run_dir is not None and tcfg.save_every else None
    stream = micro_batches(examples, tcfg, skip=state.micro_batches)
    watch = LossWatch(tcfg.spike_factor if getattr(loss_fn, "loss_is_quality", True) else None)
    stopper = EarlyStopping(tcfg.patience, state.best_metric, state.best_step, state.bad_evals)
    resumed_tokens = state.tokens
    loss_value, val_loss, stopped = float("nan"), None, False
    module.train()
    rank, size = world()
    for step in range(state.step + 1, steps + 1):
        interrupt.check()
        if on_step is not None:
            on_step(step)
        step_groups = [next(stream) for _ in range(tcfg.grad_accum)]  # every rank draws the same step
        groups, counted = _forwards(step_groups, rank, size, per_forward or tcfg.batch_size, bool(per_forward))
        loss_value, n_step = accumulate(module, [collate_fn(g, pad_id) for g in groups], call_module, placement,
                                        scaler, strategy, counted)
        spike = watch.check(step, loss_value, lambda: (checkpoint_dirs(ckpt_root) or [None])[-1] if ckpt_root else None)
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = strategy.clip_grad_norm(module, tcfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scale_log = strategy.optimizer_step(module, optimizer, scheduler, scaler)
        logger.count(loss_fn.step_tokens() if hasattr(loss_fn, "step_tokens") else  # known once the step ran
                     sum(getattr(e, "n_tokens", None) or len(e.input_ids) for g in step_groups for e in g),
                     n_step)  # real tokens, no padding
        state = TrainState(step, state.micro_batches + len(step_groups), logger.tokens, logger.trained_tokens,
                           stopper.best, stopper.best_step, stopper.bad)
        if step % tcfg.log_every == 0 or step == steps:
            extra = loss_fn.pop_metrics() if hasattr(loss_fn, "pop_metrics") else {}
            logger.progress(step, loss_value, lr, grad_norm=round(float(grad_norm), 6), **extra, **scale_log,
                            **({"spike": 1} if spike else {}))
        is_best = False
        if (val_examples or evaluator) and (step == steps or (tcfg.eval_every and step % tcfg.eval_every == 0)):
            metrics = evaluator(step) if evaluator else {
                "val_loss": evaluate_loss(module, val_examples, call_module, pad_id, tcfg.batch_size, placement)}
            val_loss = metrics.get("val_loss")
            select = metrics.pop("select", val_loss)
            is_best = select is not None and stopper.update(step, select)
            state.best_metric, state.best_step, state.bad_evals = stopper.best, stopper.best_step, stopper.bad
            logger.log(step, **{k: round(v, 6) for k, v in metrics.items()})
            shown = "".join(f"  {k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
            print(f"step {step:>5}/{steps}  validation{shown}" + ("  (best)" if is_best else ""), flush=True)
        stopped = stopper.should_stop
        if ckpt_root and (step % tcfg.save_every == 0 or is_best or stopped or step == steps):
            strategy.save_checkpoint(ckpt_root, module, optimizer, scheduler, state, tcfg.keep_last, scaler)
        if stopped:
            print(f"early stop at step {step}: no improvement in {tcfg.patience} evaluations "
                  f"(best {stopper.best:.4f} at step {stopper.best_step})", flush=True)
            break
    if tcfg.restore_best and stopper.best_step is not None and stopper.best_step != state.step:
        strategy.restore_weights(module, ckpt_root, stopper.best_step)
    seconds = time.perf_counter() - logger.start
    return TrainResult(state.step, logger.tokens, logger.trained_tokens, loss_value, val_loss, seconds,
                       stopper.best_step, stopped, None if resume is None else int(resume.name.split("-")[1]),
                       resumed_tokens, held_bytes(module, optimizer), peak_memory(placement.device))


def held_bytes(module, optimizer) -> dict:
    """What this rank holds of the weights (trained and frozen) and of the optimizer state, in
    bytes: its shards under a sharding strategy, everything otherwise (how memory scales with ranks)."""
    def size(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's local shard
        return t.numel() * t.element_size()

    params = list(module.parameters())
    return {"trained_weights": sum(size(p) for p in params if p.requires_grad),
            "frozen_weights": sum(size(p) for p in params if not p.requires_grad),
            "optimizer_state": sum(size(v) for st in optimizer.state.values() for v in st.values()
                                   if torch.is_tensor(v) and v.dim() > 0)}


def optimizer_step(optimizer, scheduler, scaler) -> dict:
    """One optimizer and schedule step; with an fp16 scaler, a step whose gradients overflowed is
    skipped (the scaler lowers its scale instead) and so is its schedule step, as in transformers'
    Trainer. Returns what to log: the loss scale, and whether the step was skipped."""
    if scaler is None:
        optimizer.step()
        scheduler.step()
        return {}
    before = scaler.get_scale()
    scaler.step(optimizer)  # skips optimizer.step() when unscale_ found inf/nan gradients
    scaler.update()
    skipped = scaler.get_scale() < before
    if not skipped:
        scheduler.step()
    return {"loss_scale": scaler.get_scale(), **({"skipped": 1} if skipped else {})}


def _forwards(step_groups: list[Items], rank: int, size: int, per_forward: int, recut: bool) -> tuple[list[Items], int]:
    """(this rank's forwards of the step, how many of them are its own). One process keeps the
    drawn micro-batches (unless cut into forwards of `per_forward` examples); several cut their
    share into forwards of up to `per_forward` (train.batch_size). Every rank makes as many forwards
    as the rank with the most (a short last batch of an epoch splits unevenly): the missing ones
    repeat the step's first example, weighted zero."""
    if size == 1 and not recut:
        return step_groups, len(step_groups)
    flat = [e for g in step_groups for e in g]
    shares = [rank_share(flat, r, size) for r in range(size)]
    most = max(math.ceil(len(share) / per_forward) for share in shares)
    mine = shares[rank]
    own = [mine[i:i + per_forward] for i in range(0, len(mine), per_forward)]
    return own + [flat[:1]] * (most - len(own)), len(own)


_ONE_PROCESS = Strategy(None, None)
