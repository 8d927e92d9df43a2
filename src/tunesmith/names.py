"""Names that registries own, as config field types.

The registry is the only list of its names: a config field of one of these kinds is a string
checked against the registry when a value is given, and `tunesmith init` and the CLI's choices
list the same names. Registries sit below config (they must not import it), so each is imported
here only when a value is checked or its names are listed.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator

# kind -> (module, function of the module returning the names); extra names a config adds before them
_REGISTRIES: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "data format": ("tunesmith.data.formats", lambda m: m.FORMAT_NAMES, ("auto",)),
    "chat template": ("tunesmith.data.templates", lambda m: m.NAMED, ()),
    "method": ("tunesmith.methods", lambda m: m.method_names(), ()),
    "objective": ("tunesmith.recipes", lambda m: m.RECIPES, ()),
    "preference loss": ("tunesmith.training.preference", lambda m: m.PREFERENCE_LOSSES, ()),
    "rl loss": ("tunesmith.training.rl", lambda m: m.RL_LOSSES, ()),
    "eval task kind": ("tunesmith.eval", lambda m: m.EVALUATORS, ()),
    "generation metric": ("tunesmith.eval.metrics", lambda m: m.METRICS, ()),
    "answer end": ("tunesmith.eval.answer_end", lambda m: m.ANSWER_ENDS, ("auto",)),
    "tracker": ("tunesmith.training.trackers", lambda m: m.TRACKERS, ()),
    "allocator": ("tunesmith.training.allocator", lambda m: m.LIBRARIES, ("auto", "system")),
    "strategy": ("tunesmith.training.distributed.strategy", lambda m: m.STRATEGIES, ("auto",)),
    "launcher": ("tunesmith.training.distributed.launch", lambda m: m.LAUNCHERS, ()),
    "attention": ("tunesmith.models.attention", lambda m: m.IMPLEMENTATIONS, ("auto",)),
}


def registered_names(kind: str) -> tuple[str, ...]:
    """The names a config accepts for `kind`, in the registry's order (CLI choices use these too)."""
    module, names, extra = _REGISTRIES[kind]
    return (*extra, *names(importlib.import_module(module)))


class _OneOf:
    """Field metadata: the value must be a name of the `kind` registry."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, value: str) -> str:
        names = registered_names(self.kind)
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {self.kind} {value!r}{hint}; one of: {', '.join(names)}")
        return value


def Registered(kind: str):  # noqa: N802 (a type)
    return Annotated[str, AfterValidator(_OneOf(kind))]


def _registry_of(metadata) -> tuple[str, ...] | None:
    kinds = [m.func.kind for m in metadata if isinstance(getattr(m, "func", None), _OneOf)]
    return registered_names(kinds[0]) if kinds else None


def allowed_values(annotation, metadata=()) -> tuple[str, ...] | None:
    """The values a field accepts when they are a fixed set (a Literal or a registry), else None.
    For a pydantic field: allowed_values(field.annotation, field.metadata)."""
    if (names := _registry_of(metadata)) is not None:
        return names
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is Annotated:
        return _registry_of(annotation.__metadata__)
    if get_args(annotation):  # X | None, list[X]
        found = [v for a in get_args(annotation) if (v := allowed_values(a))]
        return found[0] if found else None
    return None
