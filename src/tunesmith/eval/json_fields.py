"""Metrics for structured (JSON) answers: whole-object exact match, validity, per-field accuracy."""
from __future__ import annotations

import json
import re

FENCE = "```"
# What may follow the object in a finished reply that parse_json_object accepts: whitespace only, or
# in a fenced reply whitespace, the closing backticks, whitespace. Both sets are closed under taking
# a prefix, so text after the object that is not a prefix of a match can never become one.
_AFTER_OBJECT = {False: re.compile(r"\s*"), True: re.compile(r"\s*`*\s*")}


def parse_json_object(text: str) -> dict | None:
    """The reply as a JSON object, tolerating a Markdown code fence around it; None if it is not one."""
    text = text.strip()
    if text.startswith(FENCE):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def json_reply_decided(text: str) -> bool:
    """True when no continuation of the reply `text` can make it parse as an object: it starts
    with something other than `{` or a code fence, or its first object is complete and followed by
    text that parse_json_object does not strip (prose, a second object). Ending generation there
    changes no score of json_metrics (the reply scores zero either way); a reply that could still
    parse (an object still open, or closed and followed by whitespace or a closing fence only) is
    never decided."""
    s = text.lstrip()
    fenced = s.startswith(FENCE)
    if fenced:
        s = s.lstrip("`")
        if "json".startswith(s):  # the fence's language tag may still be coming
            return False
        s = s.removeprefix("json").lstrip()
    elif FENCE.startswith(s):  # nothing yet, or the start of a fence
        return False
    if not s:
        return False
    if s[0] != "{":
        return True
    try:
        _, end = json.JSONDecoder().raw_decode(s)
    except json.JSONDecodeError:
        return False  # the object is not closed yet (or malformed: left to run, which costs only time)
    return _AFTER_OBJECT[fenced].fullmatch(s[end:]) is None


def json_metrics(predictions: list[str], references: list[dict], fields: tuple[str, ...]) -> dict[str, float]:
    """exact_match: parsed object equals the reference; json_valid: parses as an object;
    field_accuracy: share of (example, field) pairs with the right value. Fractions 0-1."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    exact = valid = fields_ok = 0
    for pred, ref in zip(predictions, references):
        obj = parse_json_object(pred)
        if obj is None:
            continue
        valid += 1
        exact += obj == ref
        fields_ok += sum(1 for f in fields if f in obj and obj[f] == ref[f])
    n = max(len(references), 1)
    return {"exact_match": exact / n, "json_valid": valid / n, "field_accuracy": fields_ok / (n * len(fields))}
