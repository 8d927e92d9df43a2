"""Where a generated answer ends, so that generation can stop there (generation.generate's `end_at`).

ANSWER_ENDS is the registry of answer ends (eval.tasks[].answer_end): name -> function
`end(text) -> int | None`, the index in the reply-so-far `text` where its answer ends (`text[:i]`
is the answer), or None while it has not ended. An end must be decided by the prefix alone: once it
returns i for a text, it returns i for every continuation of that text. So generation may stop at
the first token after which it returns a value, and the answer is the one that generating to
max_new_tokens and cutting there would give, while the row's remaining tokens are never computed.
(json's refusal of a reply that opens with prose is the one position that moves, and it moves
only inside replies that score nothing either way: see json_end.)

A generation task's default (answer_end: auto) comes from its metrics (METRIC_ANSWER_ENDS): a
label metric reads one line, `json` one object, the others the whole reply. This module imports
nothing heavy: config validation reads the names.
"""
from __future__ import annotations

from collections.abc import Callable

from tunesmith.eval.json_fields import json_reply_decided


def line_end(text: str) -> int | None:
    """The first line break after the reply's first non-blank character (blank lines the model
    writes before its answer do not end it)."""
    start = len(text) - len(text.lstrip())
    i = text.find("\n", start)
    return i if i >= 0 else None


def json_object_end(text: str) -> int | None:
    """Just past the brace that closes the reply's first top-level JSON object, or None while
    none has closed. Braces inside strings (escaped quotes included) do not count; a fence or
    other text around the object is left to the metric (parse_json_object)."""
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def json_end(text: str) -> int | None:
    """The end of the first top-level object; or, for a reply that opens with something no JSON
    object or code fence can start with (json_reply_decided: prose, another fence language), the
    text so far: such a reply parses as no object however it goes on or wherever it is cut, so it
    scores nothing either way and needs no more tokens."""
    end = json_object_end(text)
    if end is not None:
        return end
    return len(text) if json_reply_decided(text) else None


ANSWER_ENDS: dict[str, Callable[[str], int | None] | None] = {
    "none": None,        # the whole reply: up to end of turn / EOS, max_new_tokens or a `stop` string
    "line": line_end,    # label tasks: the answer is one line
    "json": json_end,    # JSON tasks: the answer is one object
}

# metric (eval/metrics.METRICS) -> the answer end its tasks default to; metrics not named read the whole reply
METRIC_ANSWER_ENDS: dict[str, str] = {"accuracy": "line", "macro_f1": "line", "json": "json"}


def resolve_answer_end(answer_end: str, metrics: list[str]) -> str:
    """`auto` -> the answer end of the first metric that implies one (`none` when none does)."""
    if answer_end != "auto":
        return answer_end
    return next((METRIC_ANSWER_ENDS[m] for m in metrics if m in METRIC_ANSWER_ENDS), "none")


def answer_end_function(name: str) -> Callable[[str], int | None] | None:
    if name not in ANSWER_ENDS:
        raise ValueError(f"unknown answer end {name!r}; one of: {', '.join(ANSWER_ENDS)}")
    return ANSWER_ENDS[name]
