"""A create-job request (OpenAI's shape, plus a `tunesmith` object of config keys) -> the run's
Config, validated exactly as `tunesmith train` validates it (config.parse_config).

OpenAI's hyperparameters map onto config keys; "auto" (or leaving one out) keeps tunesmith's
default. A key given both ways (n_epochs and tunesmith train.epochs) is refused, as is any key
that would point the run at a server path (data, run and output locations come from the jobs
folder; data only by file id) or run code shipped with weights.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.config import Config, parse_config
from tunesmith.errors import ConfigError
from tunesmith.jobs.layout import RUN_NAME

SUFFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHECKPOINTS_PER_RUN = 10  # train.save_every when the request sets none: pause and restart lose little

# Config keys a request may not set (dotted prefixes), and why: the fix goes in the message.
FORBIDDEN = {
    "model.name": "the job's base model is the request's `model`",
    "model.trust_remote_code": "the server never runs code shipped with weights for a job",
    "data.train": "training data comes by file id: upload it with POST /v1/files and pass training_file",
    "data.validation": "validation data comes by file id: pass validation_file",
    "data.sources": "data comes by file id only (training_file, validation_file)",
    "run": "the jobs service names and places the run directory",
    "prepare": "`tunesmith data prepare` settings do not apply to a training job",
    "eval.tasks": "eval tasks read server paths; the dashboard's compare evaluates on the job's files",
    "train.distributed.deepspeed.config": "a DeepSpeed JSON is a server path; set its keys under "
                                          "train.distributed.deepspeed instead",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Auto = Literal["auto"]


class Hyperparameters(_Strict):
    n_epochs: Auto | int | None = Field(None, description="Passes over the training data (train.epochs).")
    batch_size: Auto | int | None = Field(None, description="Examples per optimizer step (train.batch_size).")
    learning_rate_multiplier: Auto | float | None = Field(None, description="Times tunesmith's default lr.")
    beta: Auto | float | None = Field(None, description="dpo: preference strength (objective.beta).")


class _MethodBody(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: _MethodBody | None = None
    dpo: _MethodBody | None = None


class CreateJob(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older top-level form (supervised)
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    tunesmith: dict[str, Any] | None = None


@dataclass
class JobSpec:
    request: CreateJob
    method: dict                  # {"type": ..., TYPE: {"hyperparameters": resolved numbers}}
    hyperparameters: dict         # the resolved numbers, as the job object reports them
    seed: int
    tunesmith: dict = field(default_factory=dict)  # the extension, flattened to dotted keys


class SpecError(ConfigError):
    """A request that cannot become a run; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_request(payload: Any) -> CreateJob:
    if not isinstance(payload, dict):
        raise SpecError("the request body must be a JSON object")
    try:
        return CreateJob.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise SpecError(f"unknown field '{where}'; tunesmith config keys go in the 'tunesmith' object "
                            "(e.g. {\"tunesmith\": {\"method.r\": 8}})", param=where) from None
        raise SpecError(f"field '{where}': {err['msg']}", param=where) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}, "method.r": 8} -> {"train.lr": 1e-4, "method.r": 8}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"tunesmith: keys must be non-empty strings (got {key!r})", param="tunesmith")
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.endswith("columns") and dotted != "eval.gates":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _forbidden(key: str) -> str | None:
    for prefix, why in FORBIDDEN.items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def _method(req: CreateJob) -> tuple[str, Hyperparameters]:
    method = req.method or Method()
    body = getattr(method, method.type)
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise SpecError(f"method.type is {method.type} but method.{other} is set; set method.{method.type}",
                        param=f"method.{other}")
    hp = body.hyperparameters if body is not None else Hyperparameters()
    if req.hyperparameters is not None:
        if method.type != "supervised" or body is not None:
            raise SpecError("top-level hyperparameters are OpenAI's older form for supervised jobs; put them in "
                            f"method.{method.type}.hyperparameters", param="hyperparameters")
        hp = req.hyperparameters
    if method.type == "supervised" and hp.beta is not None:
        raise SpecError("beta is a dpo hyperparameter; a supervised job has no preference strength",
                        param="method.supervised.hyperparameters.beta")
    return method.type, hp


def _hyper_keys(kind: str, hp: Hyperparameters, defaults: Config) -> dict[str, Any]:
    """Config keys set by the hyperparameters that are numbers (auto: tunesmith's default)."""
    keys: dict[str, Any] = {}
    for name, value in hp.model_dump().items():
        if value is None or value == "auto":
            continue
        if isinstance(value, bool) or value <= 0:
            raise SpecError(f"{name} must be a positive number or \"auto\" (got {value!r})",
                            param=f"method.{kind}.hyperparameters.{name}")
        if name == "n_epochs":
            keys["train.epochs"] = value
        elif name == "batch_size":
            keys["train.batch_size"] = value
        elif name == "learning_rate_multiplier":
            keys["train.lr"] = defaults.train.lr * value
        elif name == "beta":
            keys["objective.beta"] = value
    return keys


def build(payload: Any, base_name: str, base_spec: str, train_path: Path, validation_path: Path | None,
          runs_dir: Path, train_rows: int | None = None) -> tuple[JobSpec, Config]:
    """The request checked and turned into the run's Config. base_name: the served base's model
    name (the only `model` a job may name); base_spec: what `model.name` must say to load it."""
    req = parse_request(payload)
    if req.model != base_name:
        raise SpecError(f"model {req.model!r} is not the base this server serves ({base_name!r}); jobs fine-tune "
                        "the served base so that the result is served as an adapter on it", param="model")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise SpecError("suffix must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                        param="suffix")
    if req.integrations:
        raise SpecError("integrations (Weights & Biases) are not offered by this server; set "
                        "tunesmith: {\"train.trackers\": [\"wandb\"]} to log offline inside the run", param="integrations")
    kind, hp = _method(req)
    defaults = Config()
    extension = flatten(req.tunesmith or {})
    for key in extension:
        why = _forbidden(key)
        if why:
            raise SpecError(f"tunesmith.{key} cannot be set on a job: {why}", param=f"tunesmith.{key}")
    hyper = _hyper_keys(kind, hp, defaults)
    both = sorted(set(hyper) & set(extension))
    if both:
        raise SpecError(f"{both[0]} is set twice: by a hyperparameter and by tunesmith.{both[0]}; keep one",
                        param=f"tunesmith.{both[0]}")
    if "train.seed" in extension and req.seed is not None:
        raise SpecError("train.seed is set twice: by seed and by tunesmith.train.seed; keep one", param="seed")
    seed = req.seed if req.seed is not None else int(extension.get("train.seed", defaults.train.seed))
    objective = {"objective.name": "dpo"} if kind == "dpo" else {}
    if "objective.name" in extension and extension["objective.name"] != ("dpo" if kind == "dpo" else "sft"):
        raise SpecError(f"tunesmith.objective.name={extension['objective.name']} disagrees with method.type={kind}",
                        param="tunesmith.objective.name")
    data: dict = {"model": {"name": base_spec},
                  "data": {"train": str(train_path), "validation": str(validation_path) if validation_path else None},
                  "run": {"output_dir": str(runs_dir), "name": RUN_NAME}}
    overrides = {**extension, **hyper, **objective, "train.seed": seed}
    cfg = _validated(data, overrides)
    if cfg.method.name == "full":
        raise SpecError("method full trains every weight: the result could not be served as an adapter on the shared "
                        "base; choose an adapter method (lora, dora, qlora, ...) or run `tunesmith train`",
                        param="tunesmith.method.name")
    if cfg.train.save_every == 0 and train_rows:
        cfg = _validated(data, {**overrides, "train.save_every": auto_save_every(cfg, train_rows)})
    resolved = {"n_epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                "learning_rate_multiplier": cfg.train.lr / defaults.train.lr}
    if kind == "dpo":
        resolved["beta"] = cfg.objective.beta
    resolved = {k: (int(v) if float(v).is_integer() and k != "learning_rate_multiplier" else v)
                for k, v in resolved.items()}
    spec = JobSpec(request=req, method={"type": kind, kind: {"hyperparameters": resolved}},
                   hyperparameters=resolved, seed=seed, tunesmith=extension)
    return spec, cfg


def _validated(data: dict, overrides: dict[str, Any]) -> Config:
    tree = _copy(data)
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"tunesmith.{key}: '{part}' is not a section", param=f"tunesmith.{key}")
        node[parts[-1]] = value
    try:
        return parse_config(tree, "job request")
    except ConfigError as exc:
        raise SpecError(str(exc), param="tunesmith") from None


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def total_steps(cfg: Config, train_rows: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(train_rows * cfg.train.epochs / per_step))


def auto_save_every(cfg: Config, train_rows: int) -> int:
    return max(1, math.ceil(total_steps(cfg, train_rows) / CHECKPOINTS_PER_RUN))


def fine_tuned_model_name(base_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's ft:<base>:<suffix>:<id> (the id without its 'ftjob-' prefix; '/' of a hub id kept
    out of the name)."""
    return f"ft:{base_name.replace('/', '--')}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"
