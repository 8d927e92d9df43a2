"""The verdict and the advice: when a run does not fit, the cheapest changes that make it fit, each
re-planned (memory and time) with its config overrides, cheapest first: gradient checkpointing,
QLoRA, a smaller micro-batch with more accumulation (same examples per step), a shorter max_length,
FSDP / ZeRO-3 over N GPUs, CPU offload; combinations (checkpointing with each) only when no single
change fits.

Every candidate is an override list applied to the user's config and validated exactly as a command
line would be (config.apply_overrides + parse_config), so a change the config refuses (DeepSpeed with
fp16, say) is never suggested, and what is printed can be pasted after `tunesmith train CONFIG`."""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import ConfigError

MAX_GPUS = 64  # the largest world FSDP / ZeRO-3 advice tries (2, 4, 8, ... up to this)
MIN_LENGTH = 64  # shorter data.max_length is no longer fine-tuning on the user's data


@dataclass(frozen=True)
class Change:
    description: str              # "gradient checkpointing: recompute activations in the backward"
    overrides: tuple[str, ...]    # config overrides that make it: ("train.gradient_checkpointing=true",)
    memory_bytes: int             # the re-planned total on one device
    fits: bool
    seconds: float                # the re-planned expected total time
    gpus: int = 0                 # devices it needs when it changes the count (0: unchanged)
    tokens_per_s: float = 0.0     # the re-planned expected tokens/s (every device together)


@dataclass(frozen=True)
class _Candidate:
    description: str
    overrides: tuple[str, ...]
    gpus: int = 0


def changed_config(cfg, overrides) -> "object":
    """`cfg` with `overrides` applied and validated as user input (ConfigError when refused)."""
    from tunesmith.config import apply_overrides, parse_config

    return parse_config(apply_overrides(cfg.model_dump(mode="json"), list(overrides)), "advice")


def advise(plan_fn, cfg, plan) -> list[Change]:
    """Changes that make `plan` fit; plan_fn(cfg, gpus) re-plans a changed config. Fitting changes
    come first, cheapest first: by device-time (expected seconds x devices: 8 GPUs for an hour cost
    more than 1 for two), then memory; when none fits, the ones that come closest (each still marked
    fits=False) so the user sees how far each goes. Combinations (checkpointing with each other
    change) are tried when no single change fits on the devices the plan has."""
    tried: dict[tuple, Change] = {}

    def attempt(c: _Candidate) -> Change | None:
        if c.overrides in tried:
            return tried[c.overrides]
        try:
            new = plan_fn(changed_config(cfg, c.overrides), c.gpus or plan.gpus)
        except ConfigError:  # a change this config refuses is not advice
            tried[c.overrides] = None
            return None
        ch = Change(c.description, c.overrides, new.memory.total, new.fits, new.time.seconds[1], c.gpus,
                    new.time.tokens_per_s[1])
        tried[c.overrides] = ch
        return ch

    singles = [ch for group in _singles(cfg, plan) if (ch := _first_fitting(group, attempt)) is not None]
    helpful = [ch for ch in singles if ch.memory_bytes < plan.memory.total]  # a change that saves nothing is noise
    if not any(ch.fits and not ch.gpus for ch in helpful) and not cfg.train.gradient_checkpointing:
        ckpt = ("train.gradient_checkpointing=true",)
        for group in _singles(cfg, plan, skip_checkpointing=True):
            combined = [_Candidate(f"gradient checkpointing + {c.description}", ckpt + c.overrides, c.gpus)
                        for c in group]
            ch = _first_fitting(combined, attempt)
            if ch is not None and ch.memory_bytes < plan.memory.total:
                helpful.append(ch)
    # device-seconds per token: the same order as seconds x GPUs, and known when the data's size is not
    cost = lambda ch: ((ch.gpus or plan.gpus) / ch.tokens_per_s if ch.tokens_per_s > 0 else float("inf"),  # noqa: E731
                       ch.memory_bytes)
    fitting = sorted((ch for ch in helpful if ch.fits), key=cost)
    if fitting:
        return fitting
    return sorted(helpful, key=lambda ch: (ch.memory_bytes, ch.seconds))[:3]


def _first_fitting(group: list[_Candidate], attempt) -> Change | None:
    """The first candidate of a group (mildest first: a smaller cut, fewer GPUs) that fits, else the
    group's last valid one (the strongest)."""
    last = None
    for c in group:
        ch = attempt(c)
        if ch is not None:
            last = ch
            if ch.fits:
                return ch
    return last


def _singles(cfg, plan, skip_checkpointing: bool = False) -> list[list[_Candidate]]:
    """Groups of alternatives, one group per kind of change, each mildest first."""
    t, w = cfg.train, plan.workload
    cuda = plan.device.kind == "cuda"
    groups: list[list[_Candidate]] = []
    if not t.gradient_checkpointing and not skip_checkpointing:
        groups.append([_Candidate("gradient checkpointing: recompute activations in the backward (~+33% compute)",
                                  ("train.gradient_checkpointing=true",))])
    if cuda and cfg.method.name in ("lora", "dora"):
        groups.append([_Candidate("QLoRA: the frozen base in 4-bit NF4, LoRA adapters trained on it"
                                  + (" (drops DoRA's magnitudes)" if cfg.method.name == "dora" else ""),
                                  ("method.name=qlora",))])
    if w.parallel > 1:
        groups.append([_Candidate(f"one example at a time instead of {w.parallel} at once (same step, slower)",
                                  ("train.parallel_examples=1",))])
    if w.micro_batch > 1:
        group, k = [], 2
        while t.batch_size % k == 0:
            bs, ga = t.batch_size // k, t.grad_accum * k
            group.append(_Candidate(f"micro-batch {bs} with {ga} accumulation steps (same {t.batch_size * t.grad_accum}"
                                    " examples per step, more forwards)",
                                    (f"train.batch_size={bs}", f"train.grad_accum={ga}")))
            k *= 2
        groups.append(group)
    lengths, n = [], w.seq_len // 2
    while n >= MIN_LENGTH:
        lengths.append(n)
        n //= 2
    if lengths:
        groups.append([_Candidate(f"data.max_length={n}: truncates every example longer than {n} tokens "
                                  "(the model no longer learns their ends)", (f"data.max_length={n}",))
                       for n in lengths])
    if cuda:
        # the same count again only when it is not sharded yet (a sharded run needs more devices)
        worlds = [n for n in _powers_of_two(max(2, plan.gpus)) if n > plan.gpus or w.strategy in ("single", "ddp")]
        more = lambda n: n if n != plan.gpus else 0  # noqa: E731 - Change.gpus: 0 when the count is unchanged
        groups.append([_Candidate(f"FSDP over {n} GPUs: weights, gradients and optimizer state sharded",
                                  ("train.distributed.strategy=fsdp", f"train.distributed.workers={n}"), more(n))
                       for n in worlds])
        groups.append([_Candidate(f"DeepSpeed ZeRO-3 over {n} GPUs: weights, gradients and optimizer state sharded",
                                  ("train.distributed.strategy=deepspeed", "train.distributed.deepspeed.zero_stage=3",
                                   f"train.distributed.workers={n}"), more(n))
                       for n in worlds])
        groups.append(_offload(cfg, plan))
    return [g for g in groups if g]


def _powers_of_two(start: int) -> list[int]:
    n, out = 2, []
    while n <= MAX_GPUS:
        if n >= start:
            out.append(n)
        n *= 2
    return out


def _offload(cfg, plan) -> list[_Candidate]:
    """CPU offload through DeepSpeed (its CPU Adam): the optimizer state first, then the weights too.
    A group of one process is still a group (`workers=1`): DeepSpeed needs one."""
    world = max(plan.gpus, 1)
    base = ("train.distributed.strategy=deepspeed", f"train.distributed.workers={world}",
            *(["train.optimizer=adamw"] if cfg.train.optimizer != "adamw" else []))  # ZeRO steps AdamW only
    return [
        _Candidate("CPU offload of the optimizer state (DeepSpeed ZeRO-2, CPU Adam; slower steps, needs host memory)",
                   (*base, "train.distributed.deepspeed.offload_optimizer=cpu")),
        _Candidate("CPU offload of the optimizer state and the weights (DeepSpeed ZeRO-3; much slower steps, "
                   "needs host memory)",
                   (*base, "train.distributed.deepspeed.zero_stage=3", "train.distributed.deepspeed.offload_optimizer=cpu",
                    "train.distributed.deepspeed.offload_params=cpu")),
    ]
