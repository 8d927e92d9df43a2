"""Task evaluation during training (eval.during_training).

At every evaluation step of the loop (train.eval_every, or every checkpoint when only
train.save_every is set, and the last step) the model being trained runs cfg.eval.tasks as it is;
results go to RUN/eval/step-N/<task>.json and their metrics into metrics.jsonl as
`eval/<task>/<metric>`. With eval.best_metric (TASK/METRIC) that metric, not the validation loss,
picks the best checkpoint (and drives train.patience / train.restore_best); at the end the
results of the weights that were saved are copied to RUN/eval/<task>.json.

Under several processes each scores its share of every task's batches (the batches one process
would run) and the results are gathered on all of them (training/distributed/group.map_shared):
every process gets one process's metrics, so they pick the same best checkpoint and stop alike;
rank 0 alone writes the files. The evaluator runs the plain model (no strategy wrapper), which
under DDP holds no collective, so processes may run different numbers of forwards.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from tunesmith.errors import ConfigError
from tunesmith.eval.results import higher_is_better


def parse_best_metric(spec: str | None, tasks) -> tuple[str, str] | None:
    if not spec:
        return None
    task, sep, metric = spec.partition("/")
    names = [t.name for t in tasks]
    if not sep or not metric:
        raise ConfigError(f"eval.best_metric {spec!r}: expected TASK/METRIC, e.g. {names[0] if names else 'task'}"
                          "/accuracy")
    if task not in names:
        raise ConfigError(f"eval.best_metric {spec!r}: no eval task named '{task}' (eval.tasks: {names})")
    return task, metric


def task_evaluator(cfg, model, tokenizer, run_dir: Path, base: Callable[[], dict] | None) -> Callable[[int], dict]:
    """evaluator(step) for the training loop: `base()` (the validation loss) plus every task."""
    from tunesmith.eval.run import check_tasks, run_tasks
    from tunesmith.generation import InferenceModel

    tasks = cfg.eval.tasks
    check_tasks(tasks)  # before training starts, not at the first evaluation
    best = parse_best_metric(cfg.eval.best_metric, tasks)
    im = InferenceModel(model, tokenizer, cfg.run.name or "training")

    def evaluate(step: int) -> dict:
        metrics = base() if base else {}
        results = run_tasks(im, tasks, Path(run_dir) / "eval" / f"step-{step}")
        for name, r in results.items():
            metrics.update({f"eval/{name}/{k}": float(v) for k, v in r.metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if best:
            task, metric = best
            if metric not in results[task].metrics:
                raise ConfigError(f"eval.best_metric {task}/{metric}: task '{task}' has metrics "
                                  f"{sorted(results[task].metrics)}")
            value = float(results[task].metrics[metric])
            metrics["select"] = -value if higher_is_better(metric) else value  # the loop keeps the lowest
        return metrics
    return evaluate


def keep_results_of(run_dir: Path, step: int | None) -> None:
    """Copy eval/step-<step>/*.json (the saved weights' evaluation) to eval/."""
    src = Path(run_dir) / "eval" / f"step-{step}"
    if step is None or not src.is_dir():
        return
    for f in src.glob("*.json"):
        shutil.copy2(f, Path(run_dir) / "eval" / f.name)
