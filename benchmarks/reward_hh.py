"""Real proof of the reward model recipe: train a reward model on hh-rlhf preference pairs, measure its
held-out pair accuracy on other pairs.

    python benchmarks/reward_hh.py [--train-pairs 256] [--heldout-pairs 200] [--max-length 192]
        [--lr 5e-4] [--out DIR] [--tunesmith a.b=VALUE ...]

Data: Anthropic's hh-rlhf helpful-base test split (../shared/data/hh-rlhf, MIT; see its SOURCE.txt),
parsed by tunesmith's own loader (full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts; the prompt
is the shared prefix up to the last assistant turn). Only pairs whose chosen and rejected sides both
fit --max-length whole are kept (so nothing is scored at a truncation cut); they are shuffled with
seed 0, the first N train and the next M, disjoint from them, are held out.

Model: the embedded SmolLM2-135M-Instruct with a new score head (random at step 0), LoRA r=16 on
all linear layers, the head trained whole; one epoch, batch 8 pairs, `tunesmith train` as a user runs
it (objective.name=reward). Held-out accuracy is measured at step 0 (the random head: near 50% by
construction, shown so the rise is visible) and after the epoch. For context the script prints
what a length rule (prefer the longer reply) gets on the same held-out pairs: helpful-base's chosen
replies are longer about 59% of the time, so a reward model that learned only length would sit there.

Budget: the defaults are sized for about 12-13 minutes on an idle 2-core CPU: 1097 helpful-base
pairs fit 192 tokens whole, 216 tokens a pair on average; 256 training pairs = 55k tokens at ~150
training tokens/s (~6 min), 200 held-out pairs scored twice = 86k tokens of forwards at ~1.8x that
rate (~5.5 min; a no-grad forward measured at 0.55-0.6 of a LoRA training step here), plus ~45 s
of loading and tokenising. The rates were measured on a 16-pair subset on a machine shared with
other jobs (load average 6 on 2 cores: ~7 training tokens/s), so the whole run is for an idle
machine; if its step-0 evaluation (printed with its time in metrics.jsonl) is much slower than
~2.5 min, lower --train-pairs. Last line: `heldout_accuracy=<x> pairs=<M>`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
MODEL = "smollm2-135m-instruct"
SEED = 0


def select_pairs(max_length: int, n_train: int, n_heldout: int):
    """(train rows, held-out rows, pairs that fit): prompt/chosen/rejected message rows whose both sides
    fit max_length whole with the model's chat template, shuffled with SEED, disjoint."""
    from tunesmith.data.dataset import load_examples
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.recipes.reward import reward_pairs
    from tunesmith.training.reward_model import use_reward_pad

    examples = load_examples(HH, skip_invalid=True, quarantine=os.devnull).examples
    tokenizer = load_tokenizer(resolve_model(MODEL).path)
    use_reward_pad(tokenizer)
    items = reward_pairs(tokenizer, examples, 10 ** 6, str(HH))
    fit = [examples[it.index] for it in items
           if max(it.pair.chosen.full_length, it.pair.rejected.full_length) <= max_length]
    random.Random(SEED).shuffle(fit)
    if len(fit) < n_train + n_heldout:
        sys.exit(f"only {len(fit)} pairs fit --max-length {max_length}; ask for fewer than "
                 f"{n_train} + {n_heldout}")

    def row(ex) -> dict:
        return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected, "source": ex.location}
    return [row(e) for e in fit[:n_train]], [row(e) for e in fit[n_train:n_train + n_heldout]], len(fit)


def length_rule(rows: list[dict]) -> float:
    """Share of pairs whose chosen reply has more characters (ties count half)."""
    def size(turns):
        return sum(len(m["content"]) for m in turns)
    return sum(1.0 if size(r["chosen"]) > size(r["rejected"]) else 0.5 if size(r["chosen"]) == size(r["rejected"])
               else 0.0 for r in rows) / max(len(rows), 1)


def interval(p: float, n: int) -> str:
    half = 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))
    return f"{p:.3f} (95% interval {max(p - half, 0):.3f}-{min(p + half, 1):.3f}, n={n})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-pairs", type=int, default=256)
    ap.add_argument("--heldout-pairs", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default=None, help="where the data and run go (default: a fresh temporary folder)")
    ap.add_argument("--tunesmith", nargs="*", default=[], metavar="A.B=VALUE", help="extra config overrides")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    out = Path(args.out) if args.out else Path(__import__("tempfile").mkdtemp(prefix="reward_hh-"))
    out.mkdir(parents=True, exist_ok=True)
    train_rows, heldout_rows, fit = select_pairs(args.max_length, args.train_pairs, args.heldout_pairs)
    for name, rows in (("train", train_rows), ("heldout", heldout_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"data: {HH.relative_to(ROOT.parent)}: {fit} pairs fit max_length {args.max_length} whole; "
          f"{len(train_rows)} train, {len(heldout_rows)} held out (disjoint, shuffled with seed {SEED})", flush=True)

    config = {"model": {"name": MODEL}, "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
              "objective": {"name": "reward"},
              "data": {"train": str(out / "train.jsonl"), "validation": str(out / "heldout.jsonl"),
                       "max_length": args.max_length},
              "train": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": args.lr, "warmup_steps": 3,
                        "log_every": 5, "seed": SEED},
              "run": {"output_dir": str(out / "runs"), "name": "rm"}}
    (out / "reward.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(out / "reward.yaml"), *args.tunesmith],
                          env=env)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"tunesmith train exited {proc.returncode}")
    manifest = json.loads((out / "runs" / "rm" / "manifest.json").read_text())
    start, end = (manifest["preference_accuracy"][k] for k in ("start", "end"))
    n = len(heldout_rows)
    print(f"\nreward model on hh-rlhf helpful-base: {len(train_rows)} training pairs (1 epoch, {manifest['steps']} "
          f"steps, {manifest['tokens']:,} tokens at {manifest['tokens_per_s']:.0f} tokens/s), "
          f"{n} held-out pairs; wall {seconds / 60:.1f} min")
    print(f"  held-out accuracy at step 0 (random score head): {interval(start['val_preference_accuracy'], n)}")
    print(f"  held-out accuracy after training:                {interval(end['val_preference_accuracy'], n)}")
    print(f"  held-out loss {start['val_loss']:.4f} -> {end['val_loss']:.4f}; "
          f"mean margin {start['val_margin']:.4f} -> {end['val_margin']:.4f}")
    print(f"  for context, prefer-the-longer-reply rule on the same pairs: {length_rule(heldout_rows):.3f}")
    print(f"  run: {out / 'runs' / 'rm'}")
    print(machine_line())
    print(f"heldout_accuracy={end['val_preference_accuracy']:.4f} pairs={n}")


if __name__ == "__main__":
    main()
