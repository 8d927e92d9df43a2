"""Checks across config keys, run when a config is validated (config.Config), before any work.

Two kinds: keys the chosen recipe refuses (recipes/__init__.py says which, and why), and keys that
do nothing without another one (train.restore_best without train.save_every...). Each error names
both keys and the fix; a key that would be silently ignored is never accepted.
"""
from __future__ import annotations

from typing import Any

from tunesmith.config import Config, DataSection, TrainSection
from tunesmith.errors import ConfigError


def config_errors(cfg: Config) -> list[str]:
    from tunesmith.recipes import get_recipe, refused_settings

    recipe = get_recipe(cfg.objective.name)
    return (refused_settings(recipe, lambda key: value_and_default(cfg, key)) + _method_option_errors(cfg)
            + _cross_field_errors(cfg))


def _method_option_errors(cfg: Config) -> list[str]:
    """method.* fields the chosen method does not read (methods/ registers what each reads)."""
    from tunesmith.methods import get_method

    method = get_method(cfg.method.name)
    unused = []
    for name in type(cfg.method).model_fields:
        value, default = value_and_default(cfg, f"method.{name}")
        if name != "name" and name not in method.options and value != default:
            unused.append(f"method.{name}={value!r}")
    if not unused:
        return []
    reads = ", ".join(f"method.{f}" for f in method.options) or "no other method.* key"
    return [f"{', '.join(unused)} does nothing with method.name={method.name} (it reads {reads}); remove "
            f"{'it' if len(unused) == 1 else 'them'}"]


def value_and_default(cfg: Config, dotted: str) -> tuple[Any, Any]:
    """(value, default) of a dotted key such as train.micro_batch."""
    *sections, name = dotted.split(".")
    node = cfg
    for part in sections:
        node = getattr(node, part)
    return getattr(node, name), type(node).model_fields[name].get_default(call_default_factory=True)


def _cross_field_errors(cfg: Config) -> list[str]:
    t, d, e = cfg.train, cfg.data, cfg.eval
    # what the loop compares checkpoints by: the validation loss, or eval.best_metric's task metric
    selection = bool(d.validation) or bool(e.during_training and e.best_metric)
    periodic = bool(t.eval_every) or bool(e.during_training and t.save_every)  # evaluations before the last step
    errors = []
    if t.restore_best and not t.save_every:
        errors.append("train.restore_best needs train.save_every > 0: the best weights are restored from a "
                      "checkpoint, and train.save_every=0 writes none")
    for key, on in (("train.patience", t.patience), ("train.restore_best", t.restore_best)):
        if on and not selection:
            errors.append(f"{key}={on} needs data.validation (or eval.best_metric with eval.during_training): "
                          "without an evaluation there is no best step to compare against")
    if t.patience and selection and not periodic:
        errors.append(f"train.patience={t.patience} needs train.eval_every > 0: with train.eval_every=0 the run "
                      "is evaluated only at its last step, so it can never stop early")
    if t.eval_every and not (d.validation or (e.during_training and e.tasks)):
        errors.append(f"train.eval_every={t.eval_every} has nothing to evaluate: set data.validation (or "
                      "eval.during_training with eval.tasks)")
    if t.keep_last != TrainSection.model_fields["keep_last"].default and not t.save_every:
        errors.append(f"train.keep_last={t.keep_last} counts checkpoints, and train.save_every=0 writes none")
    if e.during_training and not e.tasks:
        errors.append("eval.during_training needs eval.tasks: there is no task to run")
    if e.best_metric and not e.during_training:
        errors.append(f"eval.best_metric={e.best_metric!r} needs eval.during_training=true: the tasks are only "
                      "run during training then")
    if e.best_metric and e.during_training:
        from tunesmith.eval.during import parse_best_metric

        try:
            parse_best_metric(e.best_metric, e.tasks)
        except ConfigError as exc:
            errors.append(str(exc))
    if t.distributed.fsdp_cpu_offload and t.distributed.strategy != "fsdp":
        errors.append(f"train.distributed.fsdp_cpu_offload=true needs train.distributed.strategy=fsdp (it is "
                      f"{t.distributed.strategy!r}): only FSDP offloads its shards to the CPU; set the strategy "
                      "or remove the key")
    if e.during_training and t.distributed.strategy == "fsdp":
        errors.append("eval.during_training with train.distributed.strategy=fsdp: the tasks generate with the "
                      "whole model in one process, and under fsdp every rank holds only a shard of it; evaluate "
                      "the saved run afterwards with `tunesmith eval`, or use strategy ddp")
    if cfg.objective.name == "dpo" and d.validation and t.distributed.strategy == "fsdp":
        errors.append("data.validation with objective.name=dpo and train.distributed.strategy=fsdp: the held-out "
                      "preference accuracy is computed on the whole model, and under fsdp every rank holds only a "
                      "shard of it; remove data.validation or use strategy ddp")
    errors += _deepspeed_errors(t) + _rl_errors(cfg)
    if d.sources and d.train and d.train != DataSection.model_fields["train"].default:
        errors.append(f"data.train={d.train!r} and data.sources are both set: data.sources replaces data.train; "
                      "keep one")
    return errors


_GAE_ONLY = ("gamma", "lam", "vf_coef")
_GROUP_ONLY = ("scale_rewards",)


def _rl_errors(cfg: Config) -> list[str]:
    """objective rl options that only one kind of advantage reads."""
    o = cfg.objective
    if o.name != "rl":
        return []
    fields = type(o).model_fields
    unread = _GROUP_ONLY if o.advantage == "gae" else _GAE_ONLY
    errors = [f"objective.{k}={getattr(o, k)!r} does nothing with objective.advantage={o.advantage} (only "
              f"objective.advantage={'group' if o.advantage == 'gae' else 'gae'} reads it); remove it"
              for k in unread if getattr(o, k) != fields[k].default]
    strategy = cfg.train.distributed.strategy
    if strategy in ("fsdp", "deepspeed"):
        errors.append(f"objective.name=rl with train.distributed.strategy={strategy}: every rank samples its own "
                      "prompts with the whole model, which a sharding strategy splits over the ranks; use strategy "
                      "ddp (or auto)")
    return errors


def _deepspeed_errors(t: TrainSection) -> list[str]:
    """train.distributed.deepspeed.* only means something under strategy deepspeed, which also
    takes its precision and optimizer from train.* (and supports only some of them)."""
    dist = t.distributed
    changed = [f"train.distributed.deepspeed.{k}={v!r}" for k, v in dist.deepspeed.model_dump().items()
               if v != type(dist.deepspeed).model_fields[k].default]
    if dist.strategy != "deepspeed":
        return [f"{', '.join(changed)} does nothing with train.distributed.strategy={dist.strategy}: set "
                "train.distributed.strategy=deepspeed, or remove it"] if changed else []
    errors = []
    if t.precision == "fp16":
        errors.append("train.precision=fp16 with train.distributed.strategy=deepspeed: the loop's fp16 loss "
                      "scaler cannot reach DeepSpeed's partitioned gradients; use train.precision=bf16 (or "
                      "strategy ddp/fsdp for fp16)")
    if t.optimizer != "adamw":
        errors.append(f"train.optimizer={t.optimizer} with train.distributed.strategy=deepspeed: ZeRO steps "
                      "flattened partitions of the weights, which bitsandbytes' optimizers are not tested on; "
                      "use train.optimizer=adamw")
    return errors
