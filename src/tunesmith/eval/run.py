"""Running evaluation tasks: one model load, every task through its kind's evaluator, results written.

EVALUATORS (eval/__init__.py) maps a task kind to "module:function"; each function is
`evaluate(im: InferenceModel, task: EvalTaskSection) -> TaskResult` and is imported only when a
task of its kind runs (multiple choice pulls in nothing that a perplexity run needs).
"""
from __future__ import annotations

import glob
import importlib
import time
from pathlib import Path
from typing import Callable

from tunesmith.config import EvalTaskSection
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval import EVALUATORS
from tunesmith.eval.results import TaskResult, speed_text, write_result
from tunesmith.generation import InferenceModel, is_run_dir, load_for_inference, refuse_reward_run
from tunesmith.training.distributed.group import is_main


def get_evaluator(kind: str) -> Callable[[InferenceModel, EvalTaskSection], TaskResult]:
    if kind not in EVALUATORS:
        raise ConfigError(f"unknown eval task kind '{kind}'; known: {sorted(EVALUATORS)}")
    module, name = EVALUATORS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def results_dir(spec, out: str | Path | None, adapter: bool = True) -> Path:
    """--out when given; else RUN/eval for a run directory (RUN/eval/base for its base model, so
    the base's results never overwrite the tuned ones)."""
    if out is not None:
        return Path(out)
    if not isinstance(spec, InferenceModel) and is_run_dir(spec):
        return Path(spec) / "eval" / ("" if adapter else "base")
    raise ConfigError(f"{getattr(spec, 'label', spec)} is not a run directory, so its results have no home: "
                      "pass --out DIR")


def check_tasks(tasks: list[EvalTaskSection]) -> None:
    """Problems found before the model loads (which takes a while), not after it."""
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise ConfigError(f"two eval tasks are named '{t.name}'; each writes eval/<name>.json, so names "
                              "must be unique")
        seen.add(t.name)
        if t.kind not in EVALUATORS:
            raise ConfigError(f"eval task '{t.name}': unknown kind '{t.kind}'; known: {sorted(EVALUATORS)}")
        if not Path(t.path).exists() and not glob.glob(t.path):
            raise DataError(f"eval task '{t.name}': data not found: {t.path}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_summary(results: dict[str, TaskResult]) -> str:
    rows = [("task", "kind", "n", "primary", "value", "speed", "other metrics")]
    for r in results.values():
        others = ", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items() if k != r.primary)
        rows.append((r.task, r.kind, str(r.n), r.primary, _fmt(r.metrics.get(r.primary, "")), speed_text(r.speed),
                     others))
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths)) + "  " + row[6]
                     for row in rows).rstrip()


def run_task(im: InferenceModel, task: EvalTaskSection) -> TaskResult:
    t0 = time.perf_counter()
    result = get_evaluator(task.kind)(im, task)
    result.seconds = result.seconds or time.perf_counter() - t0
    result.speed = {"examples_per_s": result.n / result.seconds if result.seconds > 0 else 0.0, **result.speed}
    return result


def run_tasks(spec, tasks: list[EvalTaskSection], out_dir: str | Path | None = None,
              adapter: bool = True) -> dict[str, TaskResult]:
    """Every task on one model (spec: run directory, model spec, or an already loaded
    InferenceModel), each result written to out_dir/<task>.json as soon as it is done. Under
    several processes (eval.during_training) each scores its share of every task and all of them
    return the same results; rank 0 alone writes them."""
    check_tasks(tasks)
    out = results_dir(spec, out_dir, adapter)
    im = spec if isinstance(spec, InferenceModel) else load_for_inference(spec, adapter=adapter)
    results: dict[str, TaskResult] = {}
    was_training = im.model.training  # a model handed over mid-training: no dropout while evaluating
    im.model.eval()
    try:
        for k, task in enumerate(tasks, 1):
            print(f"[{k}/{len(tasks)}] {task.name}: {task.kind} on {task.path} ({im.label})", flush=True)
            result = run_task(im, task)  # every process gets the whole result (evaluators gather)
            path = write_result(out, result) if is_main() else out / f"{task.name}.json"  # rank 0 alone writes
            print(f"      {result.n} examples in {result.seconds:.1f} s ({speed_text(result.speed)}); "
                  f"{result.primary}={_fmt(result.metrics.get(result.primary))} -> {path}", flush=True)
            results[task.name] = result
    finally:
        im.model.train(was_training)
    if results:
        print("\n" + format_summary(results), flush=True)
    return results


def parse_task_flag(flag: str, metrics: list[str] | None = None) -> EvalTaskSection:
    """`NAME=KIND:PATH` (the command line's --task) as a task; `metrics` apply to generation tasks."""
    from pydantic import ValidationError

    name, eq, rest = flag.partition("=")
    kind, colon, path = rest.partition(":")  # KIND ends at the first colon: PATH may hold colons
    name, kind, path = name.strip(), kind.strip(), path.strip()
    if not (eq and colon and name and path):
        raise ConfigError(f"--task {flag!r}: expected NAME=KIND:PATH, e.g. banking77=generation:test.csv "
                          f"(KIND one of {sorted(EVALUATORS)})")
    if kind not in EVALUATORS:
        raise ConfigError(f"--task {flag!r}: unknown kind '{kind}'; use one of {' | '.join(sorted(EVALUATORS))}")
    if "/" in name or "\\" in name:
        raise ConfigError(f"--task {flag!r}: the name '{name}' names a result file and a gate (TASK/METRIC); "
                          "it cannot contain a slash")
    fields = {"name": name, "kind": kind, "path": path}
    if metrics and kind == "generation":
        fields["metrics"] = metrics
    try:
        return EvalTaskSection(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"--task {flag!r}: {where}: {err['msg']}") from None


def config_tasks(spec, config: str | Path | None) -> list[EvalTaskSection]:
    """eval.tasks of --config, or of a run directory's own config.yaml when no config is given."""
    from tunesmith.config import load_config

    if config is not None:
        return list(load_config(config).eval.tasks)
    if not isinstance(spec, InferenceModel) and is_run_dir(spec) and (Path(spec) / "config.yaml").is_file():
        return list(load_config(Path(spec) / "config.yaml").eval.tasks)
    return []


def select_tasks(spec, config: str | Path | None, flags: list[str], metrics: list[str] | None = None,
                 limit: int | None = None) -> list[EvalTaskSection]:
    """The config's tasks followed by the --task ones; `limit` (a quick look) replaces every task's."""
    tasks = config_tasks(spec, config) + [parse_task_flag(f, metrics) for f in flags]
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of records, got {limit}")
    if limit is not None:
        tasks = [t.model_copy(update={"limit": limit}) for t in tasks]
    return tasks


def call_harness(im: InferenceModel, tasks: list[str], out_dir: Path, limit: int | None):
    """lm-eval harness tasks through tunesmith.eval.harness, with a clear error where it is missing."""
    try:
        from tunesmith.eval.harness import run_harness
    except ModuleNotFoundError as exc:
        if exc.name == "tunesmith.eval.harness":
            raise ConfigError("--harness needs tunesmith.eval.harness, which this installation lacks") from None
        raise ConfigError(f"--harness needs lm-eval ({exc.name} is missing): "
                          "pip install 'tunesmith[eval]'") from None
    return run_harness(im, tasks, out_dir, limit)


def run_eval(spec, config: str | Path | None = None, task_flags: list[str] = (), metrics: list[str] | None = None,
             limit: int | None = None, adapter: bool = True, out: str | Path | None = None,
             harness: str | None = None, harness_limit: int | None = None) -> dict[str, TaskResult]:
    """`tunesmith eval`: the config's and the flags' tasks, then any lm-eval harness tasks
    (comma-separated), all on one loaded model; everything is checked before the model loads."""
    from tunesmith.training.reward_model import is_reward_run

    if isinstance(spec, (str, Path)) and is_reward_run(spec) and not (task_flags or harness):
        return {"preference": _reward_run_accuracy(Path(spec), config, limit)}
    refuse_reward_run(spec)  # a reward run asked for language-model tasks: the error says what measures it
    tasks = select_tasks(spec, config, list(task_flags), metrics, limit)
    harness_tasks = [t.strip() for t in (harness or "").split(",") if t.strip()]
    if not tasks and not harness_tasks:
        where = f"{config}" if config else (f"{spec}/config.yaml" if is_run_dir(spec) else "no config given")
        raise ConfigError(f"nothing to evaluate: no eval.tasks ({where}); give --task NAME=KIND:PATH, "
                          "--config with eval.tasks, or --harness TASKS")
    check_tasks(tasks)
    out_dir = results_dir(spec, out, adapter)
    im = load_for_inference(spec, adapter=adapter)
    results = run_tasks(im, tasks, out_dir) if tasks else {}
    if harness_tasks:
        extra = call_harness(im, harness_tasks, out_dir, harness_limit)
        if isinstance(extra, dict):
            results.update(extra)
    return results


def _reward_run_accuracy(run: Path, config: str | Path | None, limit: int | None) -> TaskResult:
    """`tunesmith eval RM`: a reward model's pair accuracy on its run's held-out pairs (the
    data.validation it trained with, or --config's), through `tunesmith score`'s code."""
    import time

    from tunesmith.config import load_config
    from tunesmith.eval.reward import run_score
    from tunesmith.generation import run_config

    cfg = load_config(config) if config else run_config(run)
    if not cfg.data.validation:
        refuse_reward_run(run)  # no held-out pairs to measure it on: the error points at `tunesmith score`
    t0 = time.perf_counter()
    scored = run_score(str(run), cfg.data.validation, limit=limit)
    return TaskResult("preference", "reward", run.name, {k: float(scored[k]) for k in ("accuracy", "margin")},
                      "accuracy", scored["pairs"], settings={"path": cfg.data.validation, "limit": limit},
                      seconds=time.perf_counter() - t0)
