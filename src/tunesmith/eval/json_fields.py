"""Metrics for structured (JSON) answers: whole-object exact match, validity, per-field accuracy."""
from __future__ import annotations

import json


def parse_json_object(text: str) -> dict | None:
    """The reply as a JSON object, tolerating a Markdown code fence around it; None if it is not one."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


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
