"""Before the model loads: the run's plan for this machine, its one-line summary, and the refusal of
a run that will not fit (unless --force). A plan that cannot be made never blocks training: the
reason is printed and the run goes on (a model type the meta device cannot build, a config.json the
planner cannot read, an estimate not available for this setup).

The plan reads nothing the recipe has not read already: the data's counts come from the examples the
recipe encoded (DataStats), the parameters from the model's config on the meta device."""
from __future__ import annotations

from tunesmith.errors import ConfigError


def data_stats(lengths: list[int], trained: list[int] | None = None):
    """DataStats of the encoded training examples' token lengths (both sides of a pair summed) and,
    when given, each sequence's trained tokens."""
    from tunesmith.plan.report import DataStats

    return DataStats(examples=len(lengths), tokens=sum(lengths), longest=max(lengths, default=0),
                     trained_longest=max(trained or [], default=0))


def check_plan(cfg, force: bool, lengths: list[int], longest: int | None = None, trained: list[int] | None = None):
    """The Plan of this run on this machine with the run's world size (None when it cannot be made);
    ConfigError when it does not fit and `force` is off. `longest`: the longest single sequence when
    `lengths` sums several per example (chosen + rejected); `trained`: each sequence's trained tokens."""
    from tunesmith.training.distributed import is_main, world

    def say(line: str) -> None:
        if is_main():
            print(line, flush=True)

    try:
        from dataclasses import replace

        from tunesmith.plan.report import make_plan, size

        stats = data_stats(lengths, trained)
        if longest is not None:
            stats = replace(stats, longest=longest)
        import torch

        # whatever the plan draws (a probe's random matrices, a builder's init) leaves training's
        # random state as it was: the run is the run it would be without a plan
        with torch.random.fork_rng(devices=[]):
            plan = make_plan(cfg, gpus=world()[1], data=False, advise=True, stats=stats)
    except Exception as exc:  # noqa: BLE001 - a plan is advice: whatever stops it must not stop training
        say(f"plan: not made ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'});"
            " training goes on without it")
        return None
    say(plan.summary())
    if plan.fits:
        return plan
    short = (f"needs ~{size(plan.memory.total)} per device, {plan.device.name} has {size(plan.memory.capacity)} "
             f"(short by {size(-plan.memory.margin)})")
    if force:
        say(f"warning: the plan says this run will not fit ({short}); starting it anyway (--force)")
        return plan
    first = plan.advice[0] if plan.advice else None
    hint = (f"; {'the cheapest change that fits' if first.fits else 'the change that comes closest'}: "
            f"{first.description} ({' '.join(first.overrides)})" if first else "")
    raise ConfigError(f"this run will not fit: it {short}{hint}. `tunesmith plan CONFIG` shows the whole "
                      "estimate and every change; pass --force to start it anyway")


def refuse_sharded_validation(strategy, validation, measured: str) -> None:
    """A held-out measure computed on the whole model cannot run where every rank holds a shard of
    it (strategy auto may pick one; config_rules refuses an explicit fsdp before any work)."""
    from tunesmith.errors import ConfigError

    if strategy.shards and validation:
        raise ConfigError(f"data.validation cannot be evaluated under {strategy.describe()}: the held-out {measured} "
                          "is computed on the whole model, and every rank holds only a shard of it; remove "
                          "data.validation or set train.distributed.strategy=ddp")
