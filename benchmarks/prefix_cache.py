"""Time to first token in `tunesmith serve` when many users share one long system prompt, with the
engine's prefix cache off and on.

    python benchmarks/prefix_cache.py [--clients 32] [--per-client 2] [--system-tokens 400]
                                      [--max-tokens 32] [--budget-mb 256]

Setup: the embedded SmolLM2-135M-Instruct (fp32); a system prompt of --system-tokens tokens (a bank's
support policy, numbered rules until it is that long once rendered with the chat template) and short
user turns (banking77 test questions from ../shared/data, else the demo's order notes), rendered as
chat prompts; greedy, max_tokens --max-tokens. The engine (serve/engine.py, max_batch = clients) is
driven directly by asyncio clients, no HTTP, so the time measured is the engine's own.

Each mode (cache off: prefix_cache_mb 0; on: --budget-mb) gets a fresh engine and one warm-up request
with the system prompt and a user turn that no client sends (so with the cache on, its head is
cached, as it is on a server that has answered anyone before). Then every client sends --per-client
requests back to back; time to first token is from submit to the first streamed text of the reply
(a token that is part of a character streams with the next, the same in both modes). Wall time is
from the first request to the last answer. Both modes run the same requests; the outputs are
compared (greedy: equal but where batched float arithmetic flips a near-tie).

Last line: `ttft_ratio=<x> ttft_p90_ratio=<y> tokens_per_s_ratio=<z>`: mean (and 90th percentile)
time to first token with the cache off over with it on (above 1: the cache helps), and
tokens/s with it on over off.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import torch
from _machine import machine_line  # benchmarks/ is sys.path[0] when a benchmark runs
from serve_load import user_texts

BASE = "smollm2-135m-instruct"
RULES = ["Greet the customer by name when it is known, and never ask for a full card number or a PIN.",
         "Card payments pending for more than 8 days are reviewed by the disputes team.",
         "Transfers between own accounts are instant; transfers abroad take up to 3 working days.",
         "A lost or stolen card is frozen at once from the app; a new one arrives in 5 working days.",
         "Top-ups by card are free up to 500 a month, then cost 0.5 percent.",
         "Exchange rates are the interbank rate plus 0.4 percent on weekdays, 1 percent at weekends.",
         "Identity checks need a passport or national ID card and a selfie taken in the app."]


def user_turns(n: int) -> list[str]:
    return user_texts(n)


def system_prompt(tok, tokens: int) -> str:
    """The support policy, rule after numbered rule, until the rendered system turn has `tokens` tokens."""
    from tunesmith.data.tokenize import prompt_ids

    text, i = "You are the support assistant of a bank. Follow the policy below.", 0
    while len(prompt_ids(tok, [{"role": "system", "content": text}])) < tokens:
        text += f"\n{i + 1}. {RULES[i % len(RULES)]}"
        i += 1
    return text


async def drive(engine, prompts: list[list[int]], clients: int, per_client: int, max_tokens: int):
    """clients concurrent clients, each sending its per_client prompts back to back: (time to first
    token of every request, completions in prompt order, wall seconds)."""
    from tunesmith.serve.engine import GenRequest

    ttft, outs = [0.0] * len(prompts), [None] * len(prompts)

    async def client(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            t0 = time.perf_counter()
            handle = engine.submit(GenRequest(prompts[i], BASE, max_tokens=max_tokens))
            async for delta in handle.astream():
                if delta.text and not ttft[i]:
                    ttft[i] = time.perf_counter() - t0
            outs[i] = await handle.aresult()
            if not ttft[i]:  # nothing streamed (an empty reply): its end is its first token
                ttft[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return ttft, outs, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budget-mb", type=float, default=256.0, help="prefix_cache_mb of the cached run")
    args = ap.parse_args()
    from tunesmith.cli import quiet_upstream
    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.serve.engine import Engine, off_main_thread

    quiet_upstream()
    path = off_main_thread(lambda: resolve_model(BASE).path)  # a first run converts the GGUF
    model, tok = load_model(path).eval(), load_tokenizer(path)
    system = system_prompt(tok, args.system_tokens)
    n = args.clients * args.per_client
    turns = user_turns(n + 1)
    chat = lambda t: prompt_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": t}])
    prompts, warm = [chat(t) for t in turns[:n]], chat(turns[n] if len(turns) > n else "Hello.")
    head = len(prompt_ids(tok, [{"role": "system", "content": system}]))
    print(machine_line(), flush=True)
    print(f"{BASE} fp32, torch threads {torch.get_num_threads()}; {args.clients} clients x {args.per_client} "
          f"requests; system prompt {head} tokens, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens; max_tokens {args.max_tokens}, greedy", flush=True)

    results = {}
    for label, mb in (("cache off", 0.0), ("cache on", args.budget_mb)):
        engine = Engine(model, tok, BASE, max_batch=args.clients, batch_wait_ms=5.0, prefix_cache_mb=mb)
        engine.start()
        try:
            asyncio.run(drive(engine, [warm], 1, 1, 2))  # warm-up; with the cache on it holds the head now
            ttft, outs, wall = asyncio.run(drive(engine, prompts, args.clients, args.per_client, args.max_tokens))
            stats = dict(engine.stats)
        finally:
            engine.close()
        tokens = sum(o.completion_tokens for o in outs)
        results[label] = (ttft, outs, wall, tokens, stats)
        print(f"  {label}: {n} requests, {tokens} tokens, {wall:.1f} s", flush=True)

    print(f"\n{'run':<11}{'TTFT mean s':>12}{'p50 s':>8}{'p90 s':>8}{'wall s':>8}{'tok/s':>8}"
          f"{'prefills':>9}{'hit rows':>9}{'hit tokens':>11}")
    for label, (ttft, _, wall, tokens, stats) in results.items():
        print(f"{label:<11}{statistics.mean(ttft):>12.3f}{pct(ttft, 0.5):>8.3f}{pct(ttft, 0.9):>8.3f}{wall:>8.1f}"
              f"{tokens / wall:>8.1f}{stats['prefills']:>9}{stats.get('prefix_hits', 0):>9}"
              f"{stats.get('prefix_hit_tokens', 0):>11}")
    (off_ttft, off_outs, off_wall, off_tokens, _), (on_ttft, on_outs, on_wall, on_tokens, _) = results.values()
    same = sum(a.token_ids == b.token_ids for a, b in zip(off_outs, on_outs))
    print(f"same outputs with and without the cache: {same}/{n}")
    print(f"ttft_ratio={statistics.mean(off_ttft) / statistics.mean(on_ttft):.2f} "
          f"ttft_p90_ratio={pct(off_ttft, 0.9) / pct(on_ttft, 0.9):.2f} "
          f"tokens_per_s_ratio={(on_tokens / on_wall) / (off_tokens / off_wall):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
