"""Fine-tuning methods, registered by name. A method may change how the base model is loaded
(QLoRA loads it in 4-bit), turns the loaded model into the model to train, and says how its
result is saved: a PEFT adapter (`adapter/`) or a whole HF model directory (`model/`).

New methods register here; recipes never branch on the method name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable            # (model, method_cfg, task_type="CAUSAL_LM" | "SEQ_CLS") -> model to train
    load_kwargs: Callable      # (method_cfg) -> extra from_pretrained kwargs for the base model
    saves: str                 # "adapter" (PEFT format) or "model" (whole HF directory)
    summary: str
    options: tuple[str, ...] = ()  # method.* fields it reads: the others must stay at their defaults


METHODS: dict[str, Method] = {}


def _no_kwargs(cfg) -> dict:
    return {}


def register_method(name: str, saves: str = "adapter", load_kwargs: Callable = _no_kwargs, summary: str = "",
                    options: tuple[str, ...] = ()):
    def wrap(fn: Callable) -> Callable:
        METHODS[name] = Method(name, fn, load_kwargs, saves, summary or (fn.__doc__ or "").strip().split("\n")[0],
                               options)
        return fn
    return wrap


def method_names() -> list[str]:
    """Every registered method (config validation and `tunesmith methods` list these)."""
    from tunesmith.methods import full, peft_methods  # noqa: F401  (register their builders)

    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in method_names():
        raise ConfigError(f"method.name '{name}' is not one of {sorted(METHODS)}")
    return METHODS[name]


def apply_method(model, method_cfg):
    return get_method(method_cfg.name).build(model, method_cfg)


def save_trained(model, method_cfg, run_dir: Path, state_dict: dict | None = None) -> Path:
    """Save what the method trained in the run directory; returns the folder written. `state_dict`:
    the weights to save when the model's own are shards (gathered by the strategy)."""
    out = run_dir / get_method(method_cfg.name).saves
    model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    return out


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. 4-bit weights count as the parameters they stand for."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.dtype.itemsize == 1 and hasattr(p, "quant_state"):  # bitsandbytes packs 2 weights a byte
            n *= 2
        total += n
    return trainable, total
