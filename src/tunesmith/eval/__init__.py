"""Evaluation. EVALUATORS is the registry of task kinds (eval.tasks[].kind): kind -> "module:function"
of `evaluate(im, task) -> TaskResult`, imported only when a task of that kind runs (eval/run.py).
It lives here, importing nothing, so config validation can read the kinds without loading models."""

EVALUATORS: dict[str, str] = {
    "perplexity": "tunesmith.eval.perplexity:evaluate",
    "generation": "tunesmith.eval.tasks:evaluate",
    "multiple_choice": "tunesmith.eval.multiple_choice:evaluate",
}
