"""Do exported models still say what the trained run says?

Compares greedy continuations and next-token logits of a run's adapter on its base (the
reference) with the merged HF model and with GGUF f16, q8_0 and q4_0 files run by a real
llama.cpp (llama-cpp-python), on a fixed prompt set fed as the same token ids to every backend
(export/parity.py). Prints the machine line (benchmarks/_machine.py), one row per backend, the
replies that differ, and last a line
`identical_f16=<rate> identical_q8_0=<rate> identical_q4_0=<rate> max_logit_diff_f16=<x>`.

    python benchmarks/export_parity.py [--run runs/banking77-lora] [--formats f16,q8_0,q4_0]
                                       [--max-new-tokens 32] [--json OUT.json]

Without --run (and no runs/banking77-lora), a run is built from the embedded model with a
seeded random LoRA (non-zero B, so it changes the outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "banking77-lora"
CUSTOMER = ["I still have not received my new card, when will it arrive?", "Why was I charged a fee for a transfer?",
            "How do I top up my account with Apple Pay?", "My card payment was declined at the shop."]


def random_lora_run(out: Path) -> Path:
    from tunesmith.models.registry import resolve_model
    from tunesmith.testing import random_lora_run as make

    return make(resolve_model("smollm2-135m-instruct"), out / "random-lora")


def prompts_for(run: Path) -> list[list[dict]]:
    """The general prompt set, plus the run's own task when it trained with a system prompt."""
    import yaml

    from tunesmith.export.parity import PROMPTS

    system = (yaml.safe_load((run / "config.yaml").read_text()).get("data") or {}).get("system_prompt")
    if not system:
        return PROMPTS
    return PROMPTS + [[{"role": "system", "content": system}, {"role": "user", "content": c}] for c in CUSTOMER]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN if DEFAULT_RUN.is_dir() else None)
    ap.add_argument("--formats", default="f16,q8_0,q4_0")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.export.parity import parity, summary_line, table

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or random_lora_run(Path(tmp))
        prompts = prompts_for(run)
        start = time.perf_counter()
        report = parity(run, formats=tuple(args.formats.split(",")), prompts=prompts,
                        max_new_tokens=args.max_new_tokens)
    print(machine_line())
    print(f"run: {run}  prompts: {len(prompts)}  max_new_tokens: {args.max_new_tokens}  "
          f"({time.perf_counter() - start:.0f} s)")
    print(table(report))
    for name, row in report["backends"].items():
        for i, (ref, out) in enumerate(zip(report["reference_outputs"], row["outputs"])):
            if ref != out and "texts" in row:
                print(f"  {name} prompt {i}: reference {report['reference_texts'][i]!r}\n"
                      f"  {' ' * len(name)}           got {row['texts'][i]!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(summary_line(report))


if __name__ == "__main__":
    main()
