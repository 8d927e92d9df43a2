"""The process group of a multi-process run: made from the launcher's environment, one per run,
destroyed on every exit path.

Any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT starts a
tunesmith rank: torchrun (also under Slurm's srun), `accelerate launch`, `tunesmith train --nproc`
(torchrun's own agent, started by tunesmith), or Ray Train (which creates the group itself and
hands it over). Gradients are summed, never averaged: every rank divides its summed loss by the
step's global token count, so ranks that drew short examples are not over-weighted.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from tunesmith.errors import TunesmithError

RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what makes a process one rank of a launched run
LAUNCH_ENV = (*RANK_ENV, "MASTER_ADDR", "MASTER_PORT")


class DistributedError(TunesmithError):
    pass


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """The one gate of every writer under distribution: rank 0 owns the run directory, the
    metrics, progress lines, trackers, plots and the final save."""
    return world()[0] == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_env(env: dict | None = None) -> bool:
    """True when a launcher started this process as one rank of several (or of one, by torchrun).
    A half-set environment is an error: guessing the missing part would start a wrong run."""
    env = os.environ if env is None else env
    if not any(k in env for k in RANK_ENV):  # MASTER_ADDR/PORT alone: set by one-process launchers too
        return False
    present = [k for k in LAUNCH_ENV if k in env]
    missing = [k for k in LAUNCH_ENV if k not in env]
    if missing:
        raise DistributedError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}: a multi-process run needs "
            f"all of {', '.join(LAUNCH_ENV)}. Start it with torchrun (or `tunesmith train CONFIG --nproc N`), "
            "which sets them all, or set the missing ones")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if not env[k].isdigit():
            raise DistributedError(f"environment variable {k}={env[k]!r} is not a number")
    if int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        raise DistributedError(f"RANK={env['RANK']} is not below WORLD_SIZE={env['WORLD_SIZE']}")
    return True


def backend_for(choice: str) -> str:
    if choice != "auto":
        if choice == "nccl" and not torch.cuda.is_available():
            raise DistributedError("train.distributed.backend=nccl needs CUDA GPUs; on CPU use gloo (or auto)")
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank_device() -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={index} but this machine has {torch.cuda.device_count()} GPU(s): "
                                   "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


@contextmanager
def process_group(dcfg):
    """The run's process group, from the environment; nothing when this process was not launched
    as a rank. A group someone else made (Ray Train) is used and left to them to destroy."""
    if dist.is_available() and dist.is_initialized():
        with _peer_failures(dcfg):
            yield world()
        return
    if not launched_env():
        yield (0, 1)
        return
    device = rank_device()
    backend = backend_for(dcfg.backend)
    dist.init_process_group(backend, timeout=timedelta(seconds=dcfg.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    stdout = _quiet_other_ranks()
    try:
        with _peer_failures(dcfg):
            yield world()
    finally:
        if stdout is not None:
            sys.stdout.close()
            sys.stdout = stdout
        dist.destroy_process_group()


# what the backends say when a peer's connection broke (gloo: "Connection closed by peer"; NCCL:
# "remote process exited", "communicator was aborted") or a collective waited past the timeout
_PEER_SIGNS = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "remote", "aborted")


def _is_peer_failure(exc: BaseException) -> bool:
    if world()[1] == 1:
        return False
    if isinstance(exc, (getattr(dist, "DistNetworkError", ()), getattr(dist, "DistStoreError", ()))):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc).lower() for sign in _PEER_SIGNS)


@contextmanager
def _peer_failures(dcfg):
    """A collective that failed because another rank died (its connection closed) or stalled
    (nothing came within train.distributed.timeout_s) surfaces wherever the rank happened to be
    (backward, a broadcast, a barrier) as a backend RuntimeError; say what it means, once, here."""
    try:
        yield
    except RuntimeError as exc:
        if not _is_peer_failure(exc):
            raise
        rank, size = world()
        cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        # gloo's "... [/path/pair.cc:553] Connection closed by peer [addr]. This is typically caused ..."
        cause = re.sub(r"^.*\[[^\]]+\.(?:cc|cpp|h):\d+\] ", "", cause).split(". This is typically")[0]
        error = DistributedError(
            f"rank {rank} lost contact with the other ranks of {size} (a rank died or stalled): {cause}. The rank "
            "that stopped first printed its own error, if it could; a stalled rank is given up on after "
            f"train.distributed.timeout_s={dcfg.timeout_s:g}s")
        error.__notes__ = list(getattr(exc, "__notes__", []))  # what became of the run folder (training/rundir.py)
        raise error from exc


def _quiet_other_ranks():
    """Progress and reports come from rank 0 only (errors still reach stderr from every rank);
    TUNESMITH_LOG_ALL_RANKS=1 keeps every rank's output, to debug one."""
    if is_main() or os.environ.get("TUNESMITH_LOG_ALL_RANKS") == "1":
        return None
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    return stdout


def check_split(tcfg, size: int) -> None:
    """The step's batch (train.batch_size x train.grad_accum) is split evenly over the ranks."""
    per_step = tcfg.batch_size * tcfg.grad_accum
    if size > 1 and per_step % size:
        fit = next(a for a in range(tcfg.grad_accum, tcfg.grad_accum * size + 1) if tcfg.batch_size * a % size == 0)
        raise DistributedError(
            f"train.batch_size x train.grad_accum = {tcfg.batch_size} x {tcfg.grad_accum} = {per_step} examples per "
            f"step cannot be split evenly over {size} processes: make it a multiple of {size} "
            f"(e.g. train.grad_accum={fit})")
    if size > 1 and tcfg.parallel_examples > 1:
        raise DistributedError(f"train.parallel_examples={tcfg.parallel_examples} with {size} processes: each process "
                               "runs its examples one at a time (the processes are the parallelism); remove it")


def global_count(n: int) -> int:
    return int(_summed(n, torch.long))


def sum_scalar(x: float) -> float:
    return float(_summed(x, torch.float64))


def _summed(x, dtype: torch.dtype):
    """x added up over the ranks (x itself in one process)."""
    if world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=dtype, device=_collective_device())
    dist.all_reduce(t)
    return t.item()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl moves only CUDA tensors
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --- work dealt out over ranks (evaluation, reference log-probs) ------------------------------

def gather_lists(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank: the one place
    results of sharded work are exchanged. Every rank gets the whole list, not only rank 0, because
    what is made from it (a metric that picks the best checkpoint, a reference log-prob cache)
    drives decisions every rank must take alike."""
    size = world()[1]
    if size == 1:
        return list(items)
    parts: list = [None] * size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def map_shared(fn, units: list) -> list:
    """[fn(u) for u in units], each unit computed by one rank only and the results gathered on
    every rank in the units' order. Units are dealt round-robin: callers pass them sorted by cost
    (batches by length), so neighbours cost alike and each rank gets a like share. `fn` must hold
    no collective: ranks run different numbers of units."""
    rank, size = world()
    if size == 1:
        return [fn(u) for u in units]
    done = gather_lists([(k, fn(units[k])) for k in range(rank, len(units), size)])
    return [result for _, result in sorted(done, key=lambda kv: kv[0])]
