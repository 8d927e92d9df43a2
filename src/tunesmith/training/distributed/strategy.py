"""Strategies: how several ranks train one model, behind one interface the loop calls.

- none: one process.
- ddp: every rank holds the whole model; torch's DistributedDataParallel all-reduces gradients
  in buckets while the backward is still running (overlap), summed by a comm hook (DDP's own
  hook averages; our losses are already divided by the step's global token count).
- fsdp: torch FSDP2 (`fully_shard`), parameters, gradients and optimizer state split over ranks
  (training/distributed/fsdp.py).
- deepspeed: DeepSpeed ZeRO-2/3 (training/distributed/deepspeed.py), an optional extra.

Every strategy wraps the model together with its loss (`LossModule`): tunesmith's losses call the
decoder and the head directly (no full-vocabulary logits), so the wrapper's forward (DDP's
reducer set-up, FSDP2's root all-gather) must run around the loss, not around the model.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from pathlib import Path

import torch

from tunesmith.errors import ConfigError
from tunesmith.training.distributed.group import barrier, is_main, world


class LossModule(torch.nn.Module):
    """The model and its loss as one module: forward(batch) -> (summed loss, units)."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def inner_model(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside whatever a strategy wrapped around it."""
    while not isinstance(module, LossModule) and hasattr(module, "module"):
        module = module.module
    return module.model if isinstance(module, LossModule) else module


class Strategy:
    """One process: nothing to synchronise. The base of the others."""
    name = "none"
    shards = False  # parameters / optimizer state split over ranks: every rank writes its part of a checkpoint

    def __init__(self, placement, dcfg, reason: str = "one process"):
        self.placement, self.dcfg, self.reason = placement, dcfg, reason

    def prepare(self, model: torch.nn.Module, loss_fn) -> torch.nn.Module:
        """The module the loop calls as module(batch); wrap it for this strategy."""
        return LossModule(model, loss_fn)

    def make_optimizer(self, module: torch.nn.Module, tcfg):
        from tunesmith.training.device import make_optimizer

        params = [p for p in module.parameters() if p.requires_grad]  # after wrapping (FSDP2 replaces them)
        return make_optimizer(params, tcfg.optimizer, tcfg.lr, tcfg.weight_decay, self.placement.device)

    def no_sync(self, module: torch.nn.Module):
        """Context for a micro-batch that is not the step's last: no gradient exchange yet."""
        return contextlib.nullcontext()

    def backward(self, module: torch.nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def optimizer_step(self, module, optimizer, scheduler, scaler) -> dict:
        """One optimizer and schedule step, gradients zeroed after; returns what to log."""
        from tunesmith.training.loop import optimizer_step

        logged = optimizer_step(optimizer, scheduler, scaler)
        optimizer.zero_grad(set_to_none=True)
        return logged

    def trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full trained weights for the final save, on rank 0 (a collective under sharding);
        None: the model saves its own (every rank holds them whole)."""
        return None

    # --- checkpoints (training/checkpoint.py's format; sharded strategies override) ----------
    def save_checkpoint(self, root: Path, module, optimizer, scheduler, state, keep_last: int, scaler=None) -> None:
        from tunesmith.training.checkpoint import save_checkpoint

        if is_main():  # every rank holds the same weights and optimizer state: rank 0 writes them
            save_checkpoint(root, inner_model(module), optimizer, scheduler, state, keep_last, scaler)
        barrier()

    def load_checkpoint(self, path: Path, module, optimizer, scheduler, scaler=None):
        from tunesmith.training.checkpoint import load_checkpoint

        return load_checkpoint(path, inner_model(module), optimizer, scheduler, scaler)

    def restore_weights(self, module, ckpt_root: Path | None, step: int) -> None:
        from tunesmith.training.checkpoint import restore_weights

        restore_weights(inner_model(module), ckpt_root, step)

    def describe(self) -> str:
        return f"strategy {self.name}: {self.reason}"


def _sum_hook(state, bucket):
    """DDP comm hook: all-reduce a gradient bucket as a sum (DDP's default divides by world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DDPStrategy(Strategy):
    name = "ddp"

    def prepare(self, model, loss_fn):
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = LossModule(model, loss_fn)
        # frozen weights are identical on every rank (same file): no broadcast, no buckets for them
        frozen = [n for n, p in wrapped.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(wrapped, frozen)
        device = self.placement.device
        with warnings.catch_warnings():  # its successor still syncs buffers at init; the rotary tables need no sync
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            ddp = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False, gradient_as_bucket_view=True, bucket_cap_mb=self.dcfg.bucket_mb)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def no_sync(self, module):
        return module.no_sync()


# name -> "module:Class"; imported only when chosen (DeepSpeed is an optional extra)
STRATEGIES: dict[str, str] = {
    "ddp": "tunesmith.training.distributed.strategy:DDPStrategy",
    "fsdp": "tunesmith.training.distributed.fsdp:FSDPStrategy",
    "deepspeed": "tunesmith.training.distributed.deepspeed:DeepSpeedStrategy",
}


def _strategy_class(name: str):
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


# strategy auto keeps full fine-tuning on every rank (DDP) while it needs at most this share of a device
DDP_FIT_SHARE = 0.7


def full_training_bytes_of(trained: int, frozen_bytes: int) -> int:
    """Weights, gradients and AdamW's two moments in fp32: 16 bytes per trained parameter, plus the
    frozen weights as stored (plan/ counts them without a model)."""
    return 16 * trained + frozen_bytes


def full_training_bytes(model: torch.nn.Module) -> int:
    return full_training_bytes_of(sum(p.numel() for p in model.parameters() if p.requires_grad),
                                  sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad))


def device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total // max(1, _local_world())


def _local_world() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def choose_strategy(dcfg, method, model: torch.nn.Module, placement) -> Strategy:
    """The strategy for this run and why, said out loud like the device and precision."""
    import torch.distributed as dist

    rank, size = world()
    name = dcfg.strategy
    grouped = dist.is_available() and dist.is_initialized()
    if size == 1:
        # a launched group of one (--nproc 1) runs a sharded strategy as asked: to resume its
        # checkpoint, or ZeRO offload on one GPU. Not DeepSpeed on a CPU: one process there runs
        # its examples on threads, which ZeRO's hooks cannot share.
        if grouped and (name == "fsdp" or (name == "deepspeed" and placement.device.type == "cuda")):
            return _strategy_class(name)(placement, dcfg, "1 process in a process group, as configured "
                                                          "(train.distributed.strategy)")
        if name in ("fsdp", "deepspeed"):
            raise ConfigError(f"train.distributed.strategy={name} needs a process group: start the run with "
                              "`tunesmith train CONFIG --nproc N` or torchrun (--nproc 1 for one process)")
        why = "one process" if name == "auto" else f"one process (strategy {name} has no other rank to synchronise)"
        return Strategy(placement, dcfg, why)
    if name != "auto":
        return _strategy_class(name)(placement, dcfg, f"{size} processes, as configured (train.distributed.strategy)")
    if method.saves == "adapter":
        return DDPStrategy(placement, dcfg, f"{size} processes; adapters: every rank holds the frozen model and "
                                            "DDP exchanges only the adapter's gradients")
    need, have = full_training_bytes(model), device_bytes(placement.device)
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
    if need <= DDP_FIT_SHARE * have:
        return DDPStrategy(placement, dcfg, f"{size} processes; full fine-tuning needs ~{gb(need)} for weights, "
                                            f"gradients and AdamW state, a rank has {gb(have)}: every rank holds it (DDP)")
    return _strategy_class("fsdp")(placement, dcfg, f"{size} processes; full fine-tuning needs ~{gb(need)} for "
                                   f"weights, gradients and AdamW state, more than 70% of a rank's {gb(have)}: "
                                   "sharded over ranks (FSDP2)")
