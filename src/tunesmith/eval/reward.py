"""`tunesmith score RM --data pairs.jsonl`: a reward model's accuracy on preference pairs (the share
whose chosen reply it scores above the rejected one), mean score margin, and how many pairs."""
from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError, DataError


def pair_conversations(examples, source: str) -> tuple[list[list[dict]], list[list[dict]]]:
    """(prompt + chosen, prompt + rejected) conversations of preference rows; DataError naming the
    first row that is not one."""
    bad = next((ex for ex in examples if ex.kind != "preference"), None)
    if bad is not None:
        raise DataError(f"{bad.location}: scoring needs preference rows (prompt/chosen/rejected); this row is "
                        f"'{bad.format}' ({source})")
    return [ex.prompt + ex.chosen for ex in examples], [ex.prompt + ex.rejected for ex in examples]


def score_pairs(rm, examples, source: str, batch_size: int = 8) -> dict:
    chosen, rejected = pair_conversations(examples, source)
    scores = rm.score(chosen + rejected, batch_size)
    n = len(chosen)
    diffs = [c - r for c, r in zip(scores[:n], scores[n:])]
    return {"pairs": n, "accuracy": sum(d > 0 for d in diffs) / max(n, 1), "margin": sum(diffs) / max(n, 1),
            "chosen": sum(scores[:n]) / max(n, 1), "rejected": sum(scores[n:]) / max(n, 1)}


def run_score(model: str, data: str, limit: int | None = None, batch_size: int = 8) -> dict:
    from tunesmith.data.dataset import load_examples
    from tunesmith.training.reward_model import load_reward_model

    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of pairs, got {limit}")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if not Path(data).exists():
        raise DataError(f"--data {data}: no such file")
    rm = load_reward_model(model)  # errors name the run before the data is read
    examples = load_examples(data).examples[:limit]
    result = score_pairs(rm, examples, data, batch_size)
    rows = [("reward model", rm.label), ("data", data), ("pairs", str(result["pairs"])),
            ("accuracy", f"{result['accuracy']:.4f}"), ("mean margin", f"{result['margin']:.4f}"),
            ("mean chosen / rejected", f"{result['chosen']:.4f} / {result['rejected']:.4f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows), flush=True)
    return result
