"""The new-job form's fields, derived from the schemas the server validates with: OpenAI's
hyperparameters (spec.Hyperparameters) and every tunesmith config key a job may set (config.Config,
minus spec.FORBIDDEN), each with its description as help text and its allowed values. Nothing here
keeps a second list of names: a key added to the config appears in the form."""
from __future__ import annotations

import typing
from functools import lru_cache

from pydantic import BaseModel

from tunesmith.config import Config, allowed_values
from tunesmith.jobs import spec


def _forbidden(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in spec.FORBIDDEN)


def _kind(annotation) -> str:
    """The input the form shows: bool | int | float | str | list | dict (list/dict typed as JSON
    or comma-separated)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "dict"
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return "int" if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else "str"
    if args and origin is not None:  # X | None, str | list[str]: the first that is not None decides
        kinds = [_kind(a) for a in args]
        return "list" if "list" in kinds and "str" in kinds else kinds[0]
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation, "str")


def _nullable(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _jsonable(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def config_fields(model: type[BaseModel] = Config, prefix: str = "", defaults: BaseModel | None = None) -> list[dict]:
    defaults = defaults if defaults is not None else model()
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if _forbidden(key):
            continue
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):  # a section: its keys, dotted
            out += config_fields(type(value), key + ".", value)
            continue
        allowed = allowed_values(field.annotation, field.metadata)
        out.append({"key": key, "section": key.split(".")[0], "kind": _kind(field.annotation),
                    "nullable": _nullable(field.annotation), "default": _jsonable(value),
                    "allowed": list(allowed) if allowed else None, "help": field.description or ""})
    return out


def hyperparameter_fields() -> list[dict]:
    out = []
    for name, field in spec.Hyperparameters.model_fields.items():
        kinds = [a for a in typing.get_args(field.annotation) if a in (int, float)]
        out.append({"key": name, "kind": "int" if kinds == [int] else "float", "help": field.description or "",
                    "methods": ["dpo"] if name == "beta" else ["supervised", "dpo"]})
    return out


def export_choices() -> dict:
    """What the export buttons offer: `tunesmith export`'s own formats and GGUF types."""
    from tunesmith.export import FORMATS, GGUF_TYPES

    return {"formats": [f for f in ("merged", "gguf", "adapter") if f in FORMATS], "gguf_quants": list(GGUF_TYPES)}


@lru_cache(maxsize=1)
def _static_schema() -> dict:
    return {"methods": list(typing.get_args(spec.Method.model_fields["type"].annotation)),
            "hyperparameters": hyperparameter_fields(), "config": config_fields(),
            "forbidden": dict(spec.FORBIDDEN), "export": export_choices()}


def form_schema(base_name: str) -> dict:
    return {"base_model": base_name, **_static_schema()}
