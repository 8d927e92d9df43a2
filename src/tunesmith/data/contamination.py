"""Contamination: training rows that share a word n-gram with an evaluation set.

The default n = 13 follows GPT-3's decontamination (Brown et al. 2020, appendix C): long enough
that common phrases do not match, short enough to catch a copied question. Words are case-folded
`\\w+` runs, so punctuation and spacing differences do not hide a copy. An eval row shorter than
n words is matched whole (its full word sequence appearing in a training row), but only when it
has at least MIN_WORDS words: a one-word answer like "Yes" would otherwise mark every row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.dedup import words
from tunesmith.data.sources import iter_records
from tunesmith.errors import DataError

MIN_WORDS = 8


def ngrams(w: list[str], n: int):
    return (tuple(w[i:i + n]) for i in range(len(w) - n + 1))


@dataclass
class EvalIndex:
    n: int
    grams: dict[tuple[str, ...], str] = field(default_factory=dict)  # n-gram -> first eval row holding it
    sizes: set[int] = field(default_factory=set)  # n-gram lengths present (n, and shorter whole rows)
    rows: int = 0
    files: list[str] = field(default_factory=list)

    def add(self, text: str, where: str) -> None:
        w = words(text)
        if len(w) < MIN_WORDS:
            return
        size = min(self.n, len(w))
        self.sizes.add(size)
        for g in ngrams(w, size):
            self.grams.setdefault(g, where)
        self.rows += 1

    def match(self, text: str) -> tuple[str, str] | None:
        """(eval row, the shared words) of the first overlap found, or None."""
        w = words(text)
        for size in sorted(self.sizes, reverse=True):
            for g in ngrams(w, size):
                hit = self.grams.get(g)
                if hit is not None:
                    return hit, " ".join(g)
        return None


def strings_of(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return []


def build_index(eval_files: list[str | Path], n: int = 13) -> EvalIndex:
    """Every string of every record is indexed, whatever the record's shape: benchmarks come in
    their own layouts (ARC's question/choices, MT-Bench's turns) that no training format covers."""
    index = EvalIndex(n)
    for spec in eval_files:
        for raw in iter_records(spec):
            if raw.error:
                raise DataError(f"{raw.where}: {raw.error} (in eval file given for the contamination check)")
            index.add("\n".join(strings_of(raw.record)), raw.where)
        index.files.append(str(spec))
    return index
