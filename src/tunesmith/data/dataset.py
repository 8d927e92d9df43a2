"""From a data source to Examples: read (streaming) -> map columns -> detect -> normalise -> validate.

Bad rows stop the load with their file:line, or with skip_invalid go to a quarantine JSONL file
(location, error, raw row) and the load goes on.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.formats import (TREE_FORMATS, check_tree_row, detect_format, map_columns, normalise,
                                    oasst_conversations)
from tunesmith.data.records import Example
from tunesmith.data.sources import RawRecord, iter_records
from tunesmith.errors import DataError


@dataclass
class LoadResult:
    examples: list[Example]
    formats: Counter = field(default_factory=Counter)  # detected format -> examples
    invalid: list[dict] = field(default_factory=list)  # {"where", "error"}
    quarantine: list[Path] = field(default_factory=list)  # files the invalid rows were written to
    parts: list[dict] = field(default_factory=list)  # per source of a mixture: path, weight, available, drawn, unique

    def describe(self) -> str:
        fmts = ", ".join(f"{n} {f}" for f, n in self.formats.most_common())
        where = f" in {', '.join(map(str, self.quarantine))}" if self.quarantine else ""
        bad = f"; {len(self.invalid)} invalid rows quarantined{where}" if self.invalid else ""
        return f"{len(self.examples)} examples ({fmts}){bad}"


class _Quarantine:
    def __init__(self, path: Path | None):
        self.path, self.file = path, None

    def add(self, where: str, error: str, raw) -> None:
        if self.path is None:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # backslashreplace: a stray surrogate in a row becomes a JSON \u escape, not a crash.
            self.file = open(self.path, "w", encoding="utf-8", errors="backslashreplace")
        # default=str: Parquet/datasets rows may hold bytes, dates or decimals that JSON cannot.
        self.file.write(json.dumps({"where": where, "error": error, "raw": raw}, ensure_ascii=False, default=str)
                        + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def default_quarantine(spec: str | Path) -> Path:
    """Beside the data when that folder is writable, else in the working directory."""
    path = Path(str(spec).replace("*", "_").rstrip("/") + ".quarantine.jsonl")
    return path if os.access(path.parent, os.W_OK) else Path.cwd() / path.name


class _Trees:
    """Rows of tree formats (oasst), checked as they come so a bad one is reported with its place,
    then rebuilt into conversations once all are read."""

    def __init__(self):
        self.rows: dict[str, tuple[str, dict]] = {}

    def add(self, where: str, record: dict) -> None:
        check_tree_row(record, where)
        mid = record["message_id"]
        if mid in self.rows:  # a repeated id could link a reply back to its own ancestor
            raise DataError(f"{where}: message_id {mid!r} was already used at {self.rows[mid][0]}; ids must be unique")
        self.rows[mid] = (where, record)

    def conversations(self) -> list[Example]:
        return oasst_conversations(list(self.rows.values())) if self.rows else []


def _examples_of(raw: RawRecord, fmt: str, columns: dict[str, str] | None, system_prompt: str | None,
                 trees: _Trees) -> list[Example]:
    if raw.error:
        raise DataError(f"{raw.where}: {raw.error}")
    record = map_columns(raw.record, columns or {}, raw.where)
    row_fmt = detect_format(record, raw.where) if fmt == "auto" else fmt
    if row_fmt in TREE_FORMATS:
        trees.add(raw.where, record)
        return []
    return normalise(record, row_fmt, raw.where, None, system_prompt)


def load_examples(spec: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                  system_prompt: str | None = None, skip_invalid: bool = False,
                  quarantine: str | Path | None = None) -> LoadResult:
    result = LoadResult([])
    q = _Quarantine(Path(quarantine) if quarantine else default_quarantine(spec) if skip_invalid else None)
    trees = _Trees()
    try:
        for raw in iter_records(spec):
            try:
                examples = _examples_of(raw, fmt, columns, system_prompt, trees)
            except DataError as exc:
                if not skip_invalid:
                    raise
                result.invalid.append({"where": raw.where, "error": str(exc)})
                q.add(raw.where, str(exc), raw.raw if raw.record is None else raw.record)
                continue
            result.examples += examples
    finally:
        q.close()
    result.examples += trees.conversations()
    result.formats.update(ex.format for ex in result.examples)
    if q.file is not None:
        result.quarantine.append(q.path)
    if not result.examples:
        if result.invalid:
            raise DataError(f"{spec}: no usable records; all {len(result.invalid)} rows are invalid (see {q.path}); "
                            f"the first: {result.invalid[0]['error']}")
        raise DataError(f"{spec}: no usable records; the oasst rows form no conversation that ends in an "
                        "assistant reply")
    return result
