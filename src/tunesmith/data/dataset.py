"""From a data source to Examples: read (streaming) -> map columns -> detect -> normalise -> validate.

Bad rows stop the load with their file:line, or with skip_invalid go to a quarantine JSONL file
(location, error, raw row) and the load goes on.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.formats import TREE_FORMATS, detect_format, normalise, oasst_conversations
from tunesmith.data.records import Example
from tunesmith.data.sources import iter_records
from tunesmith.errors import DataError


@dataclass
class LoadResult:
    examples: list[Example]
    formats: Counter = field(default_factory=Counter)  # detected format -> examples
    invalid: list[dict] = field(default_factory=list)  # {"where", "error"}

    def describe(self) -> str:
        fmts = ", ".join(f"{n} {f}" for f, n in self.formats.most_common())
        bad = f"; {len(self.invalid)} invalid rows quarantined" if self.invalid else ""
        return f"{len(self.examples)} examples ({fmts}){bad}"


class _Quarantine:
    def __init__(self, path: Path | None):
        self.path, self.file = path, None

    def add(self, where: str, error: str, raw) -> None:
        if self.path is None:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")
        self.file.write(json.dumps({"where": where, "error": error, "raw": raw}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def default_quarantine(spec: str | Path) -> Path:
    return Path(str(spec).replace("*", "_") + ".quarantine.jsonl")


def load_examples(spec: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                  system_prompt: str | None = None, skip_invalid: bool = False,
                  quarantine: str | Path | None = None) -> LoadResult:
    result = LoadResult([])
    q = _Quarantine(Path(quarantine) if quarantine else default_quarantine(spec) if skip_invalid else None)
    tree_rows: list[tuple[str, dict]] = []
    try:
        for raw in iter_records(spec):
            try:
                if raw.error:
                    raise DataError(f"{raw.where}: {raw.error}")
                row_fmt = fmt
                if fmt == "auto" and not columns:
                    row_fmt = detect_format(raw.record, raw.where)
                if row_fmt in TREE_FORMATS:
                    tree_rows.append((raw.where, raw.record))
                    continue
                examples = normalise(raw.record, row_fmt, raw.where, columns, system_prompt)
            except DataError as exc:
                if not skip_invalid:
                    raise
                result.invalid.append({"where": raw.where, "error": str(exc)})
                q.add(raw.where, str(exc), raw.raw if raw.record is None else raw.record)
                continue
            result.examples += examples
            result.formats.update(ex.format for ex in examples)
    finally:
        q.close()
    if tree_rows:
        trees = oasst_conversations(tree_rows)
        result.examples += trees
        result.formats.update(ex.format for ex in trees)
    if not result.examples:
        raise DataError(f"{spec}: no usable records" + (f" ({len(result.invalid)} invalid)" if result.invalid else ""))
    return result
