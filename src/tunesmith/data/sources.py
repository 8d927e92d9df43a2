"""Reading raw records from files, streaming. Every problem is reported with its file:line.

`iter_records` never raises for a bad row: it yields a RawRecord whose `error` says what is
wrong, so the caller can stop with that message or quarantine the row (--skip-invalid).
Whole-file problems (missing, empty, unsupported type) raise DataError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tunesmith.errors import DataError


@dataclass
class RawRecord:
    where: str                 # "file:line" (or "file:record N" for formats without lines)
    record: dict | None        # None when the row is invalid
    error: str | None = None   # why the row is invalid
    raw: str | None = None     # the row's raw text, for the quarantine file


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(where, None, f"not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                             "re-encode the file as UTF-8", raw.decode("utf-8", "replace"))
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRecord(where, None, f"malformed JSON: {exc.msg} at column {exc.colno}", text)
                continue
            if not isinstance(record, dict):
                yield RawRecord(where, None, f"each line must be a JSON object, got {type(record).__name__}", text)
                continue
            yield RawRecord(where, record)


def _iter_json(path: Path) -> Iterator[RawRecord]:
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
    for i, record in enumerate(data, 1):
        where = f"{path}:record {i}"
        if isinstance(record, dict):
            yield RawRecord(where, record)
        else:
            yield RawRecord(where, None, f"a record must be an object, got {type(record).__name__}", json.dumps(record))


READERS = {".jsonl": _iter_jsonl, ".json": _iter_json}


def expand_source(spec: str | Path) -> list[Path]:
    """The files a source names: one file, or the sorted matches of a glob."""
    text = str(spec)
    if any(c in text for c in "*?["):
        base = Path(text).anchor or "."
        files = sorted(p for p in Path(base).glob(str(Path(text).relative_to(base))) if p.is_file())
        if not files:
            raise DataError(f"no files match {text}")
        return files
    path = Path(text)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return [path]


def iter_records(spec: str | Path) -> Iterator[RawRecord]:
    """Raw records of a data source, streamed."""
    files = expand_source(spec)
    if len(files) > 1:
        for f in files:
            yield from iter_records(f)
        return
    path = files[0]
    reader = READERS.get(path.suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(READERS)}")
    n = 0
    for row in reader(path):
        n += 1
        yield row
    if n == 0:
        raise DataError(f"{path}: the file holds no records")
