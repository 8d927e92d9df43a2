"""Starting the processes of a run: `tunesmith train CONFIG --nproc N` runs torchrun's own agent
(torch.distributed.launcher, what `torchrun --standalone` runs) on this machine; `launcher: ray`
hands the same command to Ray Train workers (ray_launch.py). Runs started by another launcher
(torchrun, srun + torchrun, accelerate) are already ranks and start nothing."""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import uuid

from tunesmith.training.distributed.group import DistributedError, launched_env

# name -> "module:function(argv, workers) -> exit code"; imported only when chosen
LAUNCHERS: dict[str, str] = {
    "torchrun": "tunesmith.training.distributed.launch:run_torchrun",
    "ray": "tunesmith.training.distributed.ray_launch:run_ray",
}


def wants_launch(dcfg) -> bool:
    """True when this process should start the run's processes rather than be one of them."""
    import torch.distributed as dist

    return dcfg.workers > 0 and not launched_env() and not (dist.is_available() and dist.is_initialized())


def launch(dcfg, argv: list[str]) -> int:
    """Run `python -m tunesmith <argv>` as dcfg.workers ranks with dcfg.launcher; the exit code."""
    module, fn = LAUNCHERS[dcfg.launcher].split(":")
    return getattr(importlib.import_module(module), fn)(argv, dcfg.workers)


def threads_per_rank(workers: int) -> int:
    """CPU threads for each of `workers` processes on this machine: its cores, shared out (torch's
    default, every core in every process, would oversubscribe them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def run_torchrun(argv: list[str], workers: int) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(workers)))  # inherited by the ranks
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"tunesmith-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    print(f"starting {workers} processes with torchrun ({os.environ['OMP_NUM_THREADS']} CPU thread(s) each)",
          flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", "tunesmith", *argv)
    except ChildFailedError as exc:
        raise DistributedError(describe_failures(exc.failures)) from None
    return 0


# how a rank ends when the agent (SIGTERM) or the user (SIGINT) stops it: the training loop turns
# both into KeyboardInterrupt and the CLI exits 130 (training/interrupt.py)
_STOPPED = {130, -signal.SIGTERM, -signal.SIGINT}


def describe_failures(failures: dict) -> str:
    """Which rank failed first and how (torchrun's agent stopped the others), from the agent's
    failures {global rank: ProcessFailure}. Their timestamps are whole seconds, so a rank that
    failed and the ranks stopped because of it often tie: among the earliest, a rank killed by a
    signal (SIGKILL by the OOM killer, SIGSEGV) comes before one that exited with an error, and
    both before one that was stopped."""
    def order(item):
        rank, f = item
        return f.timestamp, f.exitcode in _STOPPED, f.exitcode >= 0, rank

    (rank, first), *rest = sorted(failures.items(), key=order)
    tail = f"; rank(s) {', '.join(f'{r} ({_how(f)})' for r, f in rest)} after it" if rest else \
        "; the other ranks were stopped"
    return (f"rank {rank} (pid {first.pid}) {_how(first)}{tail}. Its own error, if it printed one, is above; "
            "a run with checkpoints continues with --resume (on any number of processes)")


def _how(failure) -> str:
    return f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
