"""Batched, left-padded, KV-cached generation (tunesmith.generation.generate) vs one prompt at a time.

    python benchmarks/generation_speed.py [--n 32] [--batch-size 16] [--max-new-tokens 32]

The same N banking77 test questions (../shared/data) as chat prompts on the embedded
SmolLM2-135M-Instruct (fp32), greedy, up to max_new_tokens each, ending at EOS:
  * batched: `generate(im, prompts, batch_size=16)` (prompts sorted by length, left-padded);
  * one at a time: `model.generate` on each unpadded prompt alone, as a plain loop would.
Both use the KV cache. Wall time covers generation only (model loading and one warm-up call
excluded), after the machine line (benchmarks/_machine.py: cores, CPU flags, measured fp32
matmul rate); the CPU other processes used meanwhile is printed and flagged above 0.1 cores (on 2
cores a busy neighbour stalls torch's 2-thread kernels, one-token decode steps worst). The
replies are compared: greedy decoding must not depend on batching, so any
difference is reported (a near-tie in the logits can flip under different matmul shapes).

Last line: `batched_examples_per_s=<x> one_at_a_time_examples_per_s=<y> speedup=<z>`.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from _machine import busy_cpu_seconds, machine_line

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "data" / "banking77" / "test.csv"
SYSTEM = "Name the banking intent of the customer's message."


def prompts(n: int) -> list[list[dict]]:
    with open(BANKING, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    step = max(len(texts) // n, 1)  # spread over the file: the intents (and lengths) vary
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in texts[::step][:n]]


@torch.no_grad()
def one_at_a_time(im, convs: list[list[dict]], max_new_tokens: int) -> list[str]:
    from tunesmith.data.tokenize import prompt_ids

    tok, out = im.tokenizer, []
    for conv in convs:
        ids = torch.tensor([prompt_ids(tok, conv)])
        gen = im.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
                                do_sample=False, temperature=None, top_p=None, top_k=None)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def timed(label: str, fn):
    """fn's result and wall seconds, printed with the CPU other processes used meanwhile: with 2
    cores, another busy process stalls torch's 2-thread kernels badly, so a busy machine is flagged."""
    wall, cpu, machine = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    other = (busy_cpu_seconds() - machine - cpu) / wall  # cores used by others
    flag = "  <- machine busy: numbers not trustworthy" if other > 0.1 else ""
    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, other processes {other:.2f} cores{flag}", flush=True)
    return result, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    if not BANKING.is_file():
        print(f"needs {BANKING}", file=sys.stderr)
        return 2
    from tunesmith.cli import quiet_upstream
    from tunesmith.generation import generate, load_for_inference

    quiet_upstream()
    im = load_for_inference("smollm2-135m-instruct")
    convs = prompts(args.n)
    generate(im, convs[:2], max_new_tokens=4, batch_size=2)  # warm-up: first-call allocations, kernels
    print(machine_line())
    print(f"{len(convs)} banking77 prompts, max_new_tokens={args.max_new_tokens}, torch threads "
          f"{torch.get_num_threads()}, {im.label}", flush=True)

    batched, b_wall = timed(f"batched (batch {args.batch_size})",
                            lambda: generate(im, convs, args.max_new_tokens, batch_size=args.batch_size))
    single, s_wall = timed("one at a time", lambda: one_at_a_time(im, convs, args.max_new_tokens))

    same = sum(a == b for a, b in zip(batched, single))
    print(f"identical replies: {same}/{len(convs)}")
    for a, b, c in zip(batched, single, convs):
        if a != b:
            print(f"  differs: {c[-1]['content'][:60]!r}\n    batched: {a[:80]!r}\n    single : {b[:80]!r}")
    print(f"example: {convs[0][-1]['content']!r} -> {batched[0][:100]!r}")
    b_rate, s_rate = len(convs) / b_wall, len(convs) / s_wall
    print(f"batched_examples_per_s={b_rate:.3f} one_at_a_time_examples_per_s={s_rate:.3f} "
          f"speedup={b_rate / s_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
