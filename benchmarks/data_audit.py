"""How fast is `tunesmith data inspect` on a realistic chat set?

Builds >= 50,000 chat records from the real datasets in ../shared/data (gsm8k, banking77,
self-instruct, oasst1, fastchat), repeated with light deterministic variation (so the set holds
real exact and near duplicates), writes them to a temporary JSONL file and runs the whole audit:
load + validate, tokenise with the chat template and loss mask, exact and MinHash near-duplicate
search, PII scan. Prints each stage's time; the last line is exactly `records/s=<n> wall_s=<n>`.

    python benchmarks/data_audit.py [--records 50000] [--workers 0] [--model smollm2-135m-instruct]
    python benchmarks/data_audit.py --near-dup-quality   # recall and false pairs of near-dup search
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = [  # (file, columns)
    ("gsm8k/train.jsonl", {"instruction": "question", "output": "answer"}),
    ("banking77/train.csv", {"instruction": "text", "output": "category"}),
    ("self-instruct/seed_tasks.jsonl", {}),
    ("oasst1-en-validation/en-validation.jsonl", {}),
    ("fastchat/dummy_conversation.json", {}),
]
# Copy k of every conversation: the original, then light edits of its first user turn, so later
# copies are exact duplicates after case/whitespace folding or near-duplicates.
VARIANTS = [lambda s: s, lambda s: "Question: " + s, lambda s: s.upper() + "  ", lambda s: s + " Answer briefly."]


def build(n: int, path: Path) -> dict:
    from tunesmith.data.dataset import load_examples

    base = []
    for rel, columns in SOURCES:
        base += [ex.messages for ex in load_examples(DATA / rel, columns=columns).examples]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for k in range(-(-n // len(base))):
            for msgs in base[:n - written]:
                first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
                edited = [dict(m) for m in msgs]
                edited[first_user]["content"] = VARIANTS[k % len(VARIANTS)](msgs[first_user]["content"])
                f.write(json.dumps({"messages": edited}, ensure_ascii=False) + "\n")
                written += 1
    return {"distinct_conversations": len(base), "records": written}


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{label:<34} {time.perf_counter() - start:7.2f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=0, help="0: every core")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--near-dup-quality", action="store_true",
                    help="instead of timing: near-duplicate recall on generated one-word edits and false pairs on "
                         "the shared sets, before/after the one-word-apart criterion (near_dup_quality.py)")
    ap.add_argument("--pairs", type=int, default=3000, help="--near-dup-quality: planted pairs")
    ap.add_argument("--show", type=int, default=0, help="--near-dup-quality: new pairs printed per set")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"needs the shared datasets at {DATA}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(machine_line(), flush=True)
    if args.near_dup_quality:
        from near_dup_quality import run

        run(DATA, args.pairs, args.show)
        return 0
    os.environ.setdefault("TUNESMITH_HOME", str(ROOT / ".tunesmith-home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tunesmith.data.audit import AuditSettings, audit
    from tunesmith.data.dataset import load_examples
    from tunesmith.data.inspect import InspectOptions, build_report, load_tokenizer_for

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        info = build(args.records, path)
        print(f"built {info['records']} chat records from {info['distinct_conversations']} distinct conversations "
              f"({path.stat().st_size / 1e6:.1f} MB); cores: {os.cpu_count()}; "
              f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        opts = InspectOptions(model=args.model, max_length=args.max_length, workers=args.workers)
        start = time.perf_counter()
        tokenizer = timed("load tokenizer", load_tokenizer_for, opts.model, opts.template)
        load = timed("load + validate", load_examples, path)
        settings = AuditSettings(opts.max_length, opts.train_on, True, opts.num_perm, opts.shingle_words)
        a = timed("tokenise + MinHash + PII (workers)", audit, load.examples, tokenizer, settings, None, opts.workers)
        report = timed("exact + near-dup search, report", build_report, str(path), load, a, opts)
        wall = time.perf_counter() - start
    n = report["records"]["total"]
    print(f"exact duplicate rows {report['exact_duplicates']['rows']}, near-duplicate rows "
          f"{report['near_duplicates']['rows']} in {report['near_duplicates']['clusters']} clusters, "
          f"truncated {report['truncated_fraction']:.2%}, trained tokens {report['trained_token_fraction']:.1%}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"records/s={n / wall:.0f} wall_s={wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
