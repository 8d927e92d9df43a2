"""Near-duplicate recall and precision, before and after the one-word-apart criterion for short rows.

Recall: rows of 5-30 real words (vocabulary from the banking77 and self-instruct texts, in random
order so no two originals are alike), each beside a copy with one word inserted, deleted or
substituted at a random place; recall is the share of those pairs found.
Precision on the real sets in ../shared/data, each row as `data prepare` sees it (all its text:
instruction, answer, labels): every pair found is checked under a strict definition, false when its
rows differ in more than 15% of their words (word-level edit distance > max(1, 0.15 x the longer
row), the edit-distance reading of the 0.85 threshold) or when the dataset labels them differently
(banking77's category). banking77 is also shown as its `text` column alone, label left out of the
row: there a one-word edit often changes the intent ("activate my card" / "cancel my card"), which
no text-only criterion can tell from a paraphrase; the label, once in the row, does.

"before": MinHash on 3-word shingles only (Jaccard >= 0.85); "after": the same plus one word apart.
    python benchmarks/data_audit.py --near-dup-quality [--pairs 3000] [--show 5]
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

THRESHOLD, NUM_PERM, SHINGLE = 0.85, 128, 3
REAL = [  # (name, file, columns, label of a row from its words or None)
    ("banking77 train (text + category)", "banking77/train.csv", {"instruction": "text", "output": "category"}),
    ("self-instruct seed tasks", "self-instruct/seed_tasks.jsonl", {}),
    ("self-instruct user-oriented", "self-instruct/user_oriented_instructions.jsonl", {}),
    ("oasst1 en validation", "oasst1-en-validation/en-validation.jsonl", {}),
    ("gsm8k train", "gsm8k/train.jsonl", {"instruction": "question", "output": "answer"}),
]


def word_edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def found_pairs(texts: list[str], one_word: bool) -> tuple[list[tuple[int, int]], list[list[str]]]:
    """Near pairs among the texts, exact copies (after case/whitespace folding) counted once, as
    `data inspect` and `data prepare` do."""
    from tunesmith.data import dedup

    ws = [dedup.words(t) for t in texts]
    sigs, has_words = dedup.word_signatures(ws, NUM_PERM, SHINGLE)
    copies = {i for g in dedup.exact_groups([dedup.exact_key(t) for t in texts]) for i in g[1:]}
    rows = [i for i in range(len(texts)) if has_words[i] and i not in copies]
    keys = [dedup.edit_keys(dedup.line_words(t)) for t in texts] if one_word else None
    return [(a, b) for a, b, _ in dedup.near_pairs(sigs, rows, THRESHOLD, keys=keys)], ws


def generated(n_pairs: int, vocab: list[str], seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    rng = random.Random(seed)
    texts, planted = [], []
    for k in range(n_pairs):
        w = [rng.choice(vocab) for _ in range(rng.randint(5, 30))]
        e, at, kind = list(w), rng.randrange(len(w)), ("insert", "delete", "substitute")[k % 3]
        if kind == "insert":
            e.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
        elif kind == "delete":
            del e[at]
        else:
            e[at] = rng.choice([v for v in vocab[:50] if v != w[at]])
        planted.append((len(texts), len(texts) + 1))
        texts += [" ".join(w), " ".join(e)]
    return texts, planted


def vocabulary(data: Path) -> list[str]:
    from tunesmith.data import dedup
    from tunesmith.data.dataset import load_examples

    seen: dict[str, None] = {}
    for rel in ("banking77/train.csv", "self-instruct/seed_tasks.jsonl"):
        cols = {"instruction": "text", "output": "category"} if "banking" in rel else {}
        for ex in load_examples(data / rel, columns=cols).examples:
            seen.update(dict.fromkeys(dedup.words(ex.all_text())))
    return sorted(seen)


def false_pairs(pairs, ws, labels=None) -> int:
    def false(a, b):
        longer = max(len(ws[a]), len(ws[b]))
        return (labels is not None and labels[a] != labels[b]) or \
            word_edit_distance(ws[a], ws[b]) > max(1, int((1 - THRESHOLD) * longer))
    return sum(false(a, b) for a, b in pairs)


def measure(name: str, texts: list[str], labels, show: int) -> None:
    before, ws = found_pairs(texts, False)
    after, _ = found_pairs(texts, True)
    fb, fa = false_pairs(before, ws, labels), false_pairs(after, ws, labels)
    print(f"{name:<42} rows {len(texts):>6}  pairs {len(before):>5} -> {len(after):>5}  "
          f"false pairs {fb:>4} -> {fa:>4}  precision {_ratio(len(before) - fb, len(before))} -> "
          f"{_ratio(len(after) - fa, len(after))}", flush=True)
    for a, b in sorted(set(after) - set(before))[:show]:
        print(f"    new: {' '.join(ws[a])[:90]!r}\n         {' '.join(ws[b])[:90]!r}")


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "  n/a"


def run(data: Path, n_pairs: int, show: int) -> None:
    from tunesmith.data.dataset import load_examples

    texts, planted = generated(n_pairs, vocabulary(data))
    for label, one_word in (("before", False), ("after", True)):
        found = set(found_pairs(texts, one_word)[0])
        recall = sum(p in found for p in planted) / len(planted)
        stray = len(found - set(planted))
        print(f"one-word edits in rows of 5-30 words, {label}: recall {recall:.3f} "
              f"({len(planted)} planted pairs), other pairs found {stray}", flush=True)
    for name, rel, columns in REAL:
        rows = [ex.all_text() for ex in load_examples(data / rel, columns=columns).examples]
        labels = [t.rsplit(None, 1)[-1] for t in rows] if "banking" in rel else None  # the category ends the row
        measure(name, rows, labels, show)
    with open(data / "banking77/train.csv", encoding="utf-8", newline="") as f:
        bank = list(csv.DictReader(f))
    measure("banking77 train (text only, no label)", [r["text"] for r in bank], [r["category"] for r in bank], show)
