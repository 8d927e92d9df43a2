"""One task's evaluation result, as written to `<run>/eval/<task>.json` and read by compare.

Every evaluator (perplexity, generation tasks, multiple choice, lm-eval harness) returns a
TaskResult; compare, the training-time evaluation and `runs show` only ever read this shape.
Per-example rows carry a stable `id` (the record's position in the task file, or its own id) so
that two models' rows can be paired, and a `score` in [0, 1] (1 = right) where the task has one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.atomic import write_json

LOWER_IS_BETTER = {"perplexity", "loss", "nll", "bits_per_byte"}


@dataclass
class TaskResult:
    task: str                       # the task's name (file stem under eval/)
    kind: str                       # perplexity | generation | multiple_choice | harness
    model: str                      # label of the evaluated model (run name or model id)
    metrics: dict[str, float]       # metric name -> value (fractions for rates, not percents)
    primary: str                    # the metric gates and best-checkpoint selection use by default
    n: int                          # records evaluated
    examples: list[dict] = field(default_factory=list)  # {"id", "input", "reference", "prediction", "score", ...}
    settings: dict = field(default_factory=dict)        # what was run (path, shots, limit, decoding ...)
    seconds: float = 0.0
    # examples_per_s (every kind: n / seconds); generation tasks add generated_tokens, tokens_per_s ...
    speed: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TaskResult":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def higher_is_better(metric: str) -> bool:
    return metric.split("/")[-1] not in LOWER_IS_BETTER


def speed_text(speed: dict) -> str:
    """e.g. "2.31 examples/s, 41.7 tokens/s" (the parts a result has)."""
    parts = [f"{speed['examples_per_s']:.2f} examples/s"] if "examples_per_s" in speed else []
    if "tokens_per_s" in speed:
        parts.append(f"{speed['tokens_per_s']:.1f} tokens/s")
    return ", ".join(parts)


def write_result(eval_dir: Path, result: TaskResult) -> Path:
    """eval_dir/<task>.json, written to a temporary file and renamed: never half-written."""
    return write_json(Path(eval_dir) / f"{result.task}.json", result.to_json(), indent=1)


def read_result(path: Path) -> TaskResult:
    return TaskResult.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def read_results(eval_dir: Path) -> dict[str, TaskResult]:
    """task name -> result for every result file directly in eval_dir."""
    out = {}
    for p in sorted(Path(eval_dir).glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"task", "kind", "metrics"} <= set(data):
            out[data["task"]] = TaskResult.from_json(data)
    return out
