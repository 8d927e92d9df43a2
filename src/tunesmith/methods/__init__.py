"""Fine-tuning methods, registered by name. A method turns a loaded base model into the model to train.

New methods register a builder here; recipes never branch on the method name.
"""
from __future__ import annotations

from typing import Callable

from tunesmith.errors import ConfigError

METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def wrap(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn
    return wrap


def apply_method(model, method_cfg):
    from tunesmith.methods import lora  # noqa: F401  (registers its builders)

    if method_cfg.name not in METHODS:
        raise ConfigError(f"method.name '{method_cfg.name}' is not one of {sorted(METHODS)}")
    return METHODS[method_cfg.name](model, method_cfg)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
