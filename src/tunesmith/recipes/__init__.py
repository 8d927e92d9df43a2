"""Recipes, one per objective, registered by `objective.name`.

Each entry also says which config keys the recipe honours and which it refuses (with why), so a
key that would do nothing under this objective is an error at load (config.py validates from
here) instead of a silent no-op. Keys are dotted paths; a section's name covers all its fields.
tests/test_config.py walks every config field and fails on one that no entry classifies.

This module imports nothing heavy and never imports config (config imports it to validate).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class Refused:
    why: str                  # what the recipe does instead, shown in the error
    allowed: tuple = ()       # values accepted besides the default: they ask for what the recipe does anyway


@dataclass(frozen=True)
class Recipe:
    name: str
    entry: str                # "module:function", imported only when the recipe runs
    summary: str
    uses: tuple[str, ...]     # keys the recipe honours
    refuses: dict[str, Refused] = field(default_factory=dict)

    @property
    def run(self) -> Callable:
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)


# Keys read by commands other than `tunesmith train`: no recipe honours or refuses them.
OTHER_COMMANDS: dict[str, str] = {
    "prepare": "tunesmith data prepare",
    "eval.tasks": "tunesmith eval / compare (and eval.during_training)",
    "eval.forgetting_threshold": "tunesmith compare",
    "eval.gates": "tunesmith compare",
}

_COMMON = ("model", "method", "run", "objective.name",
           "data.train", "data.sources", "data.validation", "data.format", "data.columns", "data.template",
           "data.system_prompt", "data.max_length", "data.skip_invalid",
           "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.activation_memory_mb",
           "train.malloc_mmap_threshold", "train.allocator", "train.lr", "train.schedule", "train.warmup_steps",
           "train.weight_decay", "train.max_grad_norm", "train.seed", "train.log_every", "train.eval_every",
           "train.save_every", "train.keep_last", "train.patience", "train.restore_best", "train.precision",
           "train.optimizer", "train.gradient_checkpointing", "train.compile", "train.spike_factor", "train.threads",
           "train.trackers", "train.distributed")
_PREFERENCE_KEYS = ("loss", "beta", "label_smoothing", "simpo_gamma", "desirable_weight", "undesirable_weight",
                    "reference")
_REWARD_KEYS = ("margin_column", "center_rewards")
_RL_KEYS = ("advantage", "rl_loss", "num_generations", "max_new_tokens", "temperature", "top_p", "kl_coef",
            "epsilon", "epsilon_high", "scale_rewards", "gamma", "lam", "vf_coef", "rewards", "reward_model")
_OBJECTIVE_KEYS = {"dpo": _PREFERENCE_KEYS, "reward": _REWARD_KEYS, "rl": _RL_KEYS}


def _objective_refusals(own: str) -> dict[str, Refused]:
    """objective.* keys of the other objectives: each one does nothing under `own`."""
    return {f"objective.{k}": Refused(f"only objective.name={name} uses it")
            for name, keys in _OBJECTIVE_KEYS.items() if name != own for k in keys}


_NO_PACKING = {
    "data.train_on": Refused("it trains on what the objective scores, never on the prompt"),
    "data.packing": Refused("rows are batched whole, never packed"),
    "train.parallel_examples": Refused("it runs micro-batches of padded rows, not examples one by one"),
    "eval.during_training": Refused("it evaluates its own held-out metric on data.validation"),
}

RECIPES: dict[str, Recipe] = {
    "sft": Recipe(
        "sft", "tunesmith.recipes.sft:run_sft", "supervised fine-tuning on the assistant replies",
        uses=(*_COMMON, "data.train_on", "data.packing", "train.micro_batch", "train.parallel_examples",
              "eval.during_training", "eval.best_metric"),
        refuses=_objective_refusals("sft")),
    "dpo": Recipe(
        "dpo", "tunesmith.recipes.dpo:run_dpo", "preference optimisation (DPO family) on prompt/chosen/rejected",
        uses=(*_COMMON, *(f"objective.{k}" for k in _PREFERENCE_KEYS)),
        refuses={
            **_objective_refusals("dpo"),
            "data.train_on": Refused("preference training scores the chosen and rejected replies only"),
            "data.packing": Refused("pairs are batched chosen-with-rejected, never packed"),
            "train.micro_batch": Refused("DPO runs micro-batches of train.batch_size padded pairs", ("batch",)),
            "train.parallel_examples": Refused("DPO runs micro-batches of padded pairs, not examples one by one"),
            "eval.during_training": Refused("DPO evaluates held-out preference accuracy on data.validation"),
            "eval.best_metric": Refused("DPO picks the best checkpoint by the held-out preference loss"),
        }),
    "reward": Recipe(
        "reward", "tunesmith.recipes.reward:run_reward",
        "a reward model (sequence score head) on prompt/chosen/rejected, Bradley-Terry loss",
        uses=(*_COMMON, *(f"objective.{k}" for k in _REWARD_KEYS)),
        refuses={
            **_objective_refusals("reward"), **_NO_PACKING,
            "train.micro_batch": Refused("the reward model runs micro-batches of train.batch_size padded pairs",
                                        ("batch",)),
            "eval.best_metric": Refused("the best checkpoint is picked by the held-out pair loss"),
        }),
    "rl": Recipe(
        "rl", "tunesmith.recipes.rl:run_rl",
        "online RL: sample k completions per prompt, score them with reward functions, PPO-clip with a KL penalty",
        uses=(*(k for k in _COMMON if k != "train.spike_factor"), *(f"objective.{k}" for k in _RL_KEYS)),
        refuses={
            **_objective_refusals("rl"), **_NO_PACKING,
            "train.spike_factor": Refused("the RL loss is about 0 at every step (advantages are centred), so no "
                                          "ratio to its mean is watched; the reward is"),
            "train.micro_batch": Refused("each forward holds the k completions of train.batch_size prompts",
                                        ("batch",)),
            "eval.best_metric": Refused("the best checkpoint is picked by the held-out mean reward"),
        }),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"objective.name '{name}' is not one of {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_for(cfg) -> Callable:
    return get_recipe(cfg.objective.name).run


def run_recipe(cfg, resume: bool = False, force: bool = False):
    """Train `cfg` in this process: alone, or as one rank of a launched run (the process group
    lives as long as the run, and is destroyed on every way out). force: start it even when its
    plan says it will not fit (recipes/preflight.py)."""
    from tunesmith.training.distributed.group import check_split, process_group

    with process_group(cfg.train.distributed) as (_, size):
        check_split(cfg.train, size)
        return recipe_for(cfg)(cfg, resume=resume, force=force)


def _covers(keys, dotted: str) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in keys)


def classify(recipe: Recipe, dotted: str) -> str | None:
    """'used', 'refused', 'other' (another command reads it) or None (nobody said)."""
    found = [kind for kind, keys in (("used", recipe.uses), ("refused", recipe.refuses), ("other", OTHER_COMMANDS))
             if _covers(keys, dotted)]
    return found[0] if len(found) == 1 else None


def refused_settings(recipe: Recipe, value_of: Callable[[str], tuple[Any, Any]]) -> list[str]:
    """Errors for refused keys set to something other than their default; `value_of(key)` gives
    (value, default)."""
    errors = []
    for key, refusal in recipe.refuses.items():
        value, default = value_of(key)
        if value != default and value not in refusal.allowed:
            errors.append(f"{key}={value!r} does nothing with objective.name={recipe.name}: {refusal.why}; "
                          f"remove it")
    return errors
