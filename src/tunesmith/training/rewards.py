"""Reward functions for online RL (objective.name=rl): built-ins, Python callables, a reward model.

Calling convention (TRL GRPOTrainer's, so its reward functions work unchanged):
    function(prompts, completions, **columns) -> list[float | None]
- prompts: one per completion (a prompt's k completions repeat it), as the data gave it (a string,
  or a list of {"role", "content"} messages);
- completions: the generated replies: plain strings, or for conversational prompts (message lists)
  each as [{"role": "assistant", "content": text}], as TRL passes them (built-ins read either);
- completion_ids: the replies' token ids, when the caller gives them (TRL's length rewards read them);
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

import difflib
import importlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable

from tunesmith.training import reward_builtins as B

# Keyword arguments Rewards passes itself; a data column of one of these names would be shadowed.
RESERVED = ("prompts", "completions", "completion_ids")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class RewardFunction:
    """A built-in: fn(prompts, completions, reference=list | None, **options) -> list[float | None]."""
    fn: Callable[..., list]
    summary: str
    needs_column: bool = False            # compares with the reference in RewardSpec.column
    options: tuple[str, ...] = ()         # RewardSpec.options keys it reads
    required: tuple[str, ...] = ()        # options it cannot run without
    optional_column: bool = False         # may read a column without needing one (json: field credit)
    check: Callable[[dict], None] | None = None     # config time: option values (no files read)
    prepare: Callable[[dict], dict] | None = None   # run start: options -> fn's keyword arguments

    @property
    def reads_column(self) -> bool:
        return self.needs_column or self.optional_column


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact": RewardFunction(B.exact, "answer equals the reference column (whitespace collapsed)", needs_column=True,
                            options=("extract", "case_sensitive"), check=B.check_exact),
    "numeric": RewardFunction(B.numeric, "the last number (or the one after options.marker) equals the reference's",
                              needs_column=True, options=("marker", "tolerance"), check=B.check_numeric),
    "json": RewardFunction(B.json_valid, "the reply is one JSON object; with a column, the share of its fields right",
                           optional_column=True, options=("fields",), check=B.check_json),
    "json_schema": RewardFunction(B.json_schema, "the reply's JSON object validates against options.schema",
                                  options=("schema",), required=("schema",), check=B.check_json_schema,
                                  prepare=B.prepare_json_schema),
    "regex": RewardFunction(B.regex, "options.pattern matches the reply (mode search or fullmatch)",
                            options=("pattern", "mode"), required=("pattern",), check=B.check_regex),
    "length": RewardFunction(B.length, "-|characters - target| / target, bounded by options.cap",
                             options=("target", "cap"), required=("target",), check=B.check_length),
}


def _is_custom(function: str) -> bool:
    return ":" in function


def check_spec(spec) -> None:
    """Config-time validation of one RewardSpec (function, column, options); raises ValueError
    naming the problem and the fix. A 'module:function' is checked for shape only here (it is
    imported when the run starts, on the machine that trains)."""
    name = spec.function
    if _is_custom(name):
        if not _IMPORT_PATH.fullmatch(name):
            raise ValueError(f"reward function {name!r} is not 'module:function' (a dotted module path, one colon, "
                             f"a function name, e.g. 'my_rewards:format_reward')")
        if spec.column is not None:
            raise ValueError(f"reward function {name!r}: `column` does nothing for a Python function (it receives "
                             f"every data column as a keyword argument): remove column: {spec.column}")
        return  # options, if any, are the arguments of a factory (see build_rewards): checked by calling it
    rf = REWARD_FUNCTIONS.get(name)
    if rf is None:
        close = difflib.get_close_matches(name, REWARD_FUNCTIONS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        module, _, attr = name.rpartition(".")
        dotted = (f" (for a Python function write 'module:function': '{module}:{attr}')" if module
                  else "; or 'module:function' for a Python function")
        raise ValueError(f"unknown reward function {name!r}: {hint}built-ins: {', '.join(REWARD_FUNCTIONS)}"
                         f"{dotted}")
    unknown = [k for k in spec.options if k not in rf.options]
    if unknown:
        close = difflib.get_close_matches(unknown[0], rf.options, n=1, cutoff=0.5)
        reads = f"it reads {', '.join(rf.options)}" if rf.options else "it reads none"
        raise ValueError(f"reward function {name!r} has no option {unknown[0]!r}"
                         f"{f' (did you mean {close[0]!r}?)' if close else ''}: {reads}")
    missing = [k for k in rf.required if k not in spec.options]
    if missing:
        raise ValueError(f"reward function {name!r} needs option {missing[0]!r} (options: {{{missing[0]}: ...}}); "
                         f"{rf.summary}")
    if rf.needs_column and not spec.column:
        raise ValueError(f"reward function {name!r} compares with a reference: set `column` to the data column "
                         f"holding it (e.g. column: answer)")
    if spec.column is not None and not rf.reads_column:
        raise ValueError(f"reward function {name!r} reads no column: remove column: {spec.column}")
    if rf.check is not None:
        try:
            rf.check(dict(spec.options))
        except ValueError as exc:
            raise ValueError(f"reward function {name!r}: {exc}") from None


class _Builtin:
    """A built-in bound to its spec, callable with TRL's convention (so it also works in TRL's
    GRPOTrainer): plain-string completions go to the function, its column's values as reference."""

    def __init__(self, name: str, rf: RewardFunction, column: str | None, options: dict):
        self.__name__ = name
        self.rf, self.column = rf, column
        self.kwargs = rf.prepare(options) if rf.prepare else dict(options)

    def __call__(self, prompts, completions, **columns) -> list:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # TRL's conversational form
        if self.column is not None and self.column not in columns:
            raise ValueError(f"reward function {self.rf.fn.__name__!r}: the data has no column {self.column!r} "
                             f"(columns: {', '.join(sorted(columns)) or 'none'})")
        reference = columns[self.column] if self.column is not None else None
        return self.rf.fn(prompts, texts, reference=reference, **self.kwargs)


class _RewardModelReward:
    """objective.reward_model as a reward function: the conversation (prompt messages, or the
    prompt text as one user message, then the reply) scored by the trained reward model."""
    __name__ = "reward_model"

    def __init__(self, path: str):
        from tunesmith.training.reward_model import load_reward_model

        self.model = load_reward_model(path)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        conversations = []
        for prompt, reply in zip(prompts, completions):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            reply = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
            conversations.append(messages + list(reply))
        return self.model.score(conversations)


def reward_function(spec, columns: set[str] | None = None) -> Callable:
    """One RewardSpec as a function with TRL's reward calling convention: a built-in bound to its
    column and options, or the imported 'module:function' (from the Python path or the working
    directory; called with spec.options first when there are any: a factory like TRL's
    get_soft_overlong_punishment(max_completion_len=..., soft_punish_cache=...))."""
    check_spec(spec)
    name = spec.function
    if not _is_custom(name):
        if columns is not None and spec.column is not None and spec.column not in columns:
            raise ValueError(f"reward function {name!r}: column {spec.column!r} is not in the data (columns: "
                             f"{', '.join(sorted(columns)) or 'none'})")
        return _Builtin(name, REWARD_FUNCTIONS[name], spec.column, spec.options)
    module_name, attr = name.split(":")
    if os.getcwd() not in sys.path:  # a rewards file next to the config imports (appended: shadows nothing)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({exc}); run "
                         f"from its directory, put that on PYTHONPATH, or install its package where the run "
                         f"trains") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                         f"has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not a function: it is {type(fn).__name__} {fn!r:.60}")
    if spec.options:
        try:
            fn = fn(**spec.options)
        except TypeError as exc:
            raise ValueError(f"reward function {name!r}: options are passed to it once to make the reward "
                             f"function, and that call failed: {exc}") from None
        if not callable(fn):
            raise ValueError(f"reward function {name!r} called with its options returned a {type(fn).__name__}, "
                             f"not a reward function (without options, it is called as the reward function)")
    return fn


@dataclass
class Rewards:
    """The run's reward functions, called on one batch of completions."""
    names: list[str]                      # one per function, unique (used as metric names: rewards/<name>/mean)
    weights: list[float]
    functions: list[Callable] = field(repr=False, default_factory=list)
    sources: list[str] = field(default_factory=list)              # each function as configured, for errors
    seconds: dict[str, float] = field(default_factory=dict)       # name -> cumulative seconds spent in it

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list[Any]],
                 completion_ids: list[list[int]] | None = None) -> list[list[float]]:
        """Per function, one reward per completion (float('nan') where the function returned None).
        Each function is called as TRL's GRPOTrainer calls one: prompts=, completions= (for
        conversational prompts, each completion as [{"role": "assistant", "content": text}]),
        completion_ids= (when given), and every column as a keyword argument."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions: repeat each prompt once per completion")
        for key, values in columns.items():
            if key in RESERVED:
                raise ValueError(f"data column {key!r} would shadow the reward functions' argument {key!r}: "
                                 f"rename it (data.columns)")
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
        if n and isinstance(prompts[0], list):  # TRL hands conversational prompts' completions as messages
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        extra = {} if completion_ids is None else {"completion_ids": completion_ids}
        out = []
        for i, (name, fn) in enumerate(zip(self.names, self.functions)):
            start = time.perf_counter()
            values = fn(prompts=prompts, completions=completions, **extra, **columns)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            out.append(self._checked(values, n, self.sources[i] if i < len(self.sources) else name))
        return out

    @staticmethod
    def _checked(values, n: int, source: str) -> list[float]:
        fix = "a reward function returns a list with one float (or None: does not apply) per completion"
        if hasattr(values, "tolist"):  # a tensor or an array
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"reward function {source!r} returned {type(values).__name__}: {fix}")
        if len(values) != n:
            raise ValueError(f"reward function {source!r} returned {len(values)} values for {n} completions: {fix}")
        out = []
        for j, v in enumerate(values):
            if v is None:
                out.append(math.nan)
            elif isinstance(v, Real) and not math.isinf(v):
                out.append(float(v))
            else:
                raise ValueError(f"reward function {source!r} returned {v!r} ({type(v).__name__}) for completion "
                                 f"{j}: {fix} (finite)")
        return out

    def total(self, per_function: list[list[float]]) -> list[float]:
        """The weighted sum per completion, NaN (None) terms left out; NaN where every term is."""
        totals = []
        for terms in zip(*per_function):
            kept = [w * r for w, r in zip(self.weights, terms) if not math.isnan(r)]
            totals.append(sum(kept) if kept else math.nan)
        return totals


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def build_rewards(specs, reward_model: str | None = None, columns: set[str] | None = None) -> Rewards:
    """The functions of objective.rewards (and objective.reward_model as one more); `columns`: the
    data's column names, to refuse a spec whose column the data lacks before any generation."""
    specs = list(specs)
    if not specs and reward_model is None:
        raise ValueError("objective.name=rl needs reward functions: set objective.rewards (e.g. "
                         "[{function: numeric, column: answer}]) or objective.reward_model")
    functions, names, sources = [], [], []
    for i, spec in enumerate(specs):
        try:
            functions.append(reward_function(spec, columns))
        except ValueError as exc:
            raise ValueError(f"objective.rewards[{i}]: {exc}") from None
        names.append(spec.function.rsplit(":", 1)[-1])
        sources.append(spec.function)
    weights = [float(s.weight) for s in specs]
    if reward_model is not None:
        functions.append(_RewardModelReward(reward_model))
        names.append("reward_model")
        sources.append(f"objective.reward_model={reward_model}")
        weights.append(1.0)
    return Rewards(_unique(names), weights, functions, sources)
