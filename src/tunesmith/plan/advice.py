"""The verdict and the advice (helper C implements `advise`): when a run does not fit, the cheapest
changes that make it fit, each re-planned (memory and time) with its config overrides, cheapest first:
gradient checkpointing, QLoRA, a smaller micro-batch with more accumulation (same examples per step),
a shorter max_length, FSDP / ZeRO-3 over N GPUs, CPU offload."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    description: str              # "gradient checkpointing: recompute activations in the backward"
    overrides: tuple[str, ...]    # config overrides that make it: ("train.gradient_checkpointing=true",)
    memory_bytes: int             # the re-planned total on one device
    fits: bool
    seconds: float                # the re-planned expected total time
    gpus: int = 0                 # devices it needs when it changes the count (0: unchanged)


def advise(plan_fn, cfg, plan) -> list[Change]:
    """Changes that make `plan` fit; plan_fn(cfg, gpus) re-plans a changed config."""
    raise NotImplementedError
