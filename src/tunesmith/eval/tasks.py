"""Generation tasks: a data split's prompts answered by the model, replies scored against the data's own.

Records come through the data pipeline (any format, `columns`, `system_prompt`), so the prompt is
rendered exactly as in training: the conversation up to its last assistant turn is the prompt,
that turn's content the reference. E.g. banking77's test.csv with
`columns: {instruction: text, output: category}` and `metrics: [accuracy, macro_f1]`.

The primary metric is the first of `task.metrics`; `json` stands for field_accuracy (a graded
score that credits partly right objects, where whole-object exact match calls them all wrong;
json_exact_match and json_valid are reported beside it).
"""
from __future__ import annotations

import random
import time

from tunesmith.config import EvalTaskSection
from tunesmith.data.dataset import load_examples
from tunesmith.data.records import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.answer_end import answer_end_function, resolve_answer_end
from tunesmith.eval.json_fields import parse_json_object
from tunesmith.eval.metrics import METRICS, Context, normalize_answer, primary_metric, score
from tunesmith.eval.results import TaskResult
from tunesmith.generation import GenerationStats, InferenceModel, generate
from tunesmith.training.distributed.group import map_shared

CHUNK = 256  # examples generated between progress lines
LABEL_METRICS = {"accuracy", "macro_f1"}


def select(n: int, task: EvalTaskSection) -> list[int]:
    """Record indices to evaluate: a seeded sample of task.sample (kept in file order), then the
    first task.limit of those."""
    idx = list(range(n))
    if task.sample is not None and task.sample < n:
        idx = sorted(random.Random(task.seed).sample(idx, task.sample))
    return idx[:task.limit] if task.limit is not None else idx


def load_task_examples(task: EvalTaskSection) -> list[Example]:
    try:
        return load_examples(task.path, task.format, task.columns or None, task.system_prompt).examples
    except DataError as exc:
        raise DataError(f"eval task '{task.name}': {exc}") from None


def split_prompt(ex: Example, task: str) -> tuple[list[dict], str]:
    """(the conversation before its last assistant turn, that turn's content)."""
    if ex.kind != "chat":
        raise DataError(f"eval task '{task}': {ex.location}: a {ex.kind} record has no reply to compare with; "
                        "a generation task needs chat-like records (messages, alpaca, prompt/completion, ...)")
    last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=-1)
    if last <= 0:
        raise DataError(f"eval task '{task}': {ex.location}: no assistant reply after a prompt, so nothing "
                        "to generate and compare")
    return ex.messages[:last], ex.messages[last]["content"]


def _check_references(task: EvalTaskSection, refs: list[str], where: list[str]) -> list[str]:
    """Fail before generating (minutes) on references the metrics could not score; returns the JSON fields."""
    if LABEL_METRICS & set(task.metrics) and task.labels:
        known = {normalize_answer(label) for label in task.labels}
        for ref, loc in zip(refs, where):
            if normalize_answer(ref) not in known:
                raise DataError(f"eval task '{task.name}': {loc}: reference {ref!r} is not one of the task's "
                                f"{len(task.labels)} labels; add it to labels or fix the record")
    if "json" not in task.metrics:
        return list(task.json_fields)
    fields = list(task.json_fields)
    for ref, loc in zip(refs, where):
        obj = parse_json_object(ref)
        if obj is None:
            raise DataError(f"eval task '{task.name}': {loc}: the reference is not a JSON object, so the "
                            f"`json` metric cannot score it: {ref[:80]!r}")
        fields = fields or list(obj)  # default: the first reference's fields
        missing = [f for f in fields if f not in obj]
        if missing:
            raise DataError(f"eval task '{task.name}': {loc}: the reference lacks json_fields {missing}")
    return fields


def _last_user(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] != "assistant"), "")


def _generate_all(im: InferenceModel, task: EvalTaskSection, prompts: list[list[dict]],
                  stats: GenerationStats | None = None) -> list[str]:
    """Replies in prompt order, each ending at its answer's end (task.answer_end). Prompts sorted
    by length (in characters: batches of similar length carry little padding) are cut into batches
    of task.batch_size whatever the number of processes, each batch generated with its own seed:
    under several processes (training) the batches are dealt out and the replies gathered, and
    every batch is the one a single process would run, so the replies (and the metrics) are its
    replies. `stats` gets the tokens and decoding steps of all processes."""
    end_at = answer_end_function(resolve_answer_end(task.answer_end, task.metrics))
    lengths = [sum(len(m["content"]) for m in p) for p in prompts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    batches = list(enumerate(order[s:s + task.batch_size] for s in range(0, len(order), task.batch_size)))
    done, t0, shown = 0, time.perf_counter(), 0

    def run(numbered: tuple[int, list[int]]) -> tuple[list[str], GenerationStats]:
        nonlocal done, shown
        k, batch = numbered
        st = GenerationStats()
        replies = generate(im, [prompts[i] for i in batch], task.max_new_tokens, task.batch_size, task.temperature,
                           task.top_p, seed=task.seed + k, stop=task.stop, end_at=end_at, stats=st)
        done += len(batch)
        if done - shown >= CHUNK:  # this process's share: the others advance alike
            shown = done
            print(f"  {task.name}: {done} generated here ({done / (time.perf_counter() - t0):.1f} examples/s)",
                  flush=True)
        return replies, st

    preds = [""] * len(prompts)
    for (_, batch), (replies, st) in zip(batches, map_shared(run, batches)):
        for i, reply in zip(batch, replies):
            preds[i] = reply
        if stats is not None:
            stats.rows, stats.tokens, stats.row_steps = (stats.rows + st.rows, stats.tokens + st.tokens,
                                                         stats.row_steps + st.row_steps)
    if stats is not None:
        stats.seconds = time.perf_counter() - t0  # wall time: under several processes their shares overlap
    return preds


def _settings(task: EvalTaskSection, n_records: int, fields: list[str]) -> dict:
    keep = ("path", "format", "columns", "system_prompt", "limit", "sample", "seed", "metrics", "labels",
            "max_new_tokens", "stop", "temperature", "top_p", "batch_size")
    return {**{k: getattr(task, k) for k in keep}, "answer_end": resolve_answer_end(task.answer_end, task.metrics),
            "json_fields": fields, "records": n_records}


def generation_speed(stats: GenerationStats) -> dict[str, float]:
    """The generation figures of a result's `speed`: tokens the replies needed, per second of generating."""
    return {"generated_tokens": stats.tokens, "decode_row_steps": stats.row_steps,
            "generation_seconds": stats.seconds,
            "tokens_per_s": stats.tokens / stats.seconds if stats.seconds > 0 else 0.0}


def evaluate(im: InferenceModel, task: EvalTaskSection) -> TaskResult:
    if not task.metrics:
        raise ConfigError(f"eval task '{task.name}': metrics is empty; name at least one of {sorted(METRICS)}")
    t0 = time.perf_counter()
    examples = load_task_examples(task)
    idx = select(len(examples), task)
    pairs = [split_prompt(examples[i], task.name) for i in idx]
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    fields = _check_references(task, refs, [examples[i].location for i in idx])
    stats = GenerationStats()
    preds = _generate_all(im, task, prompts, stats)
    scores = score(task.metrics, preds, refs, Context(labels=list(task.labels), json_fields=fields))
    primary = primary_metric(task.metrics[0])
    rows = [{"id": i, "input": _last_user(p), "reference": r, "prediction": pred,
             "score": scores.per_example[primary][k],
             "scores": {m: v[k] for m, v in scores.per_example.items()}}
            for k, (i, p, r, pred) in enumerate(zip(idx, prompts, refs, preds))]
    return TaskResult(task=task.name, kind="generation", model=im.label, metrics=scores.corpus, primary=primary,
                      n=len(rows), examples=rows, settings=_settings(task, len(examples), fields),
                      seconds=time.perf_counter() - t0, speed=generation_speed(stats))
