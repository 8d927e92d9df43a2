"""The GSM8K training rows (../shared/data) as conversational prompt/completion records: the
SFT benchmarks' shared data."""
from __future__ import annotations

import json
from pathlib import Path

GSM8K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def write_data(path: Path, n: int) -> None:
    """The first `n` rows, question as the user turn and answer as the assistant's."""
    if not GSM8K.is_file():
        raise SystemExit(f"{GSM8K} is missing: the benchmark needs ../shared/data")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}],
                                "completion": [{"role": "assistant", "content": r["answer"]}]}) + "\n")
