"""Reading records from files. Every error names the file and line and says what to fix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tunesmith.errors import DataError


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "re-encode the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(record).__name__}")
            yield lineno, record


def _iter_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} must be an object, got {type(record).__name__}")
        yield i + 1, record


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """[(location 'file:line', record)] from a .jsonl or .json file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = _iter_jsonl(path)
    elif path.suffix == ".json":
        rows = _iter_json(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl or .json")
    out = [(f"{path}:{n}", rec) for n, rec in rows]
    if not out:
        raise DataError(f"{path}: the file holds no records")
    return out
