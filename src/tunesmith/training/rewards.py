"""Reward functions for online RL (objective.name=rl): built-ins, Python callables, a reward model.

Calling convention (TRL GRPOTrainer's, so its reward functions work unchanged):
    function(prompts, completions, **columns) -> list[float | None]
- prompts: one per completion (a prompt's k completions repeat it), as the data gave it (a string,
  or a list of {"role", "content"} messages);
- completions: the generated replies, plain strings;
- columns: every other data column, each a list aligned with completions.
None means "this function does not apply to that completion" (TRL's convention); a completion
every function returns None for is unscorable and gets advantage 0.

Built-ins are registered in REWARD_FUNCTIONS (the only list of their names: config validation and
`tunesmith init` derive from it). Each says which options it reads and whether it compares with a
reference column; a config naming an option it does not read is refused (no silent no-ops).

This module sits below config (config validates RewardSpec with `check_spec`): it must not import
config, and imports nothing heavy at import time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class RewardFunction:
    """A built-in: fn(prompts, completions, reference=list | None, **options) -> list[float | None]."""
    fn: Callable[..., list]
    summary: str
    needs_column: bool = False            # compares with the reference in RewardSpec.column
    options: tuple[str, ...] = ()         # RewardSpec.options keys it reads
    required: tuple[str, ...] = ()        # options it cannot run without


REWARD_FUNCTIONS: dict[str, RewardFunction] = {}  # filled below: exact, numeric, json, json_schema, regex, length


def check_spec(spec) -> None:
    """Config-time validation of one RewardSpec (function, column, options); raises ValueError
    naming the problem and the fix. A 'module:function' is checked for shape only here (it is
    imported when the run starts, on the machine that trains)."""
    raise NotImplementedError


@dataclass
class Rewards:
    """The run's reward functions, called on one batch of completions."""
    names: list[str]                      # one per function, unique (used as metric names: rewards/<name>/mean)
    weights: list[float]
    functions: list[Callable] = field(repr=False, default_factory=list)

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list[Any]]) -> list[list[float]]:
        """Per function, one reward per completion (float('nan') where the function returned None)."""
        raise NotImplementedError


def build_rewards(specs, reward_model: str | None = None, columns: set[str] | None = None) -> Rewards:
    """The functions of objective.rewards (and objective.reward_model as one more); `columns`: the
    data's column names, to refuse a spec whose column the data lacks before any generation."""
    raise NotImplementedError
