"""Several training sources mixed by weight (`data.sources`).

The mix has as many examples as all sources together; each source's share of it follows its
weight. A source with more examples than its share gives a seeded sample without replacement;
one with fewer is repeated whole as often as fits and topped up by a sample, so every example
appears once before any appears twice. The parts are then shuffled together. Same seed, same mix.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Sequence

from tunesmith.config import SourceSection
from tunesmith.data.dataset import LoadResult, load_examples
from tunesmith.data.records import Example
from tunesmith.errors import ConfigError


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """round(total * w / sum(w)) per weight, with rounding leftovers given to the largest
    remainders (earlier sources first on ties) so the shares add up to `total` exactly."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(items: Sequence[Example], k: int, rng: random.Random) -> list[Example]:
    """k of `items`: a sample without replacement when k <= len(items); otherwise whole copies
    plus a sample, so counts differ by at most one (every item once before any twice)."""
    whole, rest = divmod(k, len(items))
    return list(items) * whole + rng.sample(list(items), rest)


def load_mixture(sources: Sequence[SourceSection], system_prompt: str | None = None, skip_invalid: bool = False,
                 seed: int = 0) -> LoadResult:
    if not sources:
        raise ConfigError("data.sources is empty; list at least one {path, weight} or set data.train instead")
    loaded = [load_examples(s.path, s.format, s.columns, system_prompt, skip_invalid) for s in sources]
    counts = shares(sum(len(r.examples) for r in loaded), [s.weight for s in sources])
    rng = random.Random(seed)
    mixed: list[Example] = []
    result = LoadResult(mixed)
    for source, part, k in zip(sources, loaded, counts):
        mixed += draw(part.examples, k, rng)
        result.invalid += part.invalid
        result.quarantine += part.quarantine
        result.parts.append({"path": source.path, "weight": source.weight, "available": len(part.examples),
                             "drawn": k, "unique": min(k, len(part.examples))})
    rng.shuffle(mixed)
    result.formats = Counter(ex.format for ex in mixed)
    print(f"mix: {describe_parts(result.parts)}", flush=True)
    return result


def describe_parts(parts: list[dict]) -> str:
    return "; ".join(f"{p['path']} {p['drawn']} (weight {p['weight']}, {p['unique']} unique of {p['available']})"
                     for p in parts)
