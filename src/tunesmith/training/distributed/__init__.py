"""Training on several processes (GPUs, machines): process group, strategies, launchers.

Everything rank-dependent lives here (DESIGN.md): who writes (`is_main`), how gradients are
exchanged (strategy.py), how processes are started (launch.py). Recipes read the same on 1
process or 64."""
from tunesmith.training.distributed.group import (  # noqa: F401
    DistributedError, barrier, broadcast, global_count, is_main, launched_env, process_group,
    sum_scalar, world)
