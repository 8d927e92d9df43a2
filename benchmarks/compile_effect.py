"""train.compile: tokens/s of the same SFT training with and without torch.compile of the decoder layers.

    python benchmarks/compile_effect.py [--model smollm2|tiny|DIR] [--steps 20] [--warmup 4]
        [--examples-per-step 8] [--set a.b=VALUE ...]

Two rows, each the SFT recipe (run_sft) in a fresh process of its own, one after the other:
uncompiled, then with train.compile=true. Everything else is the same: the model (the embedded
SmolLM2-135M-Instruct; `tiny`: a Llama of SmolLM2's shape shrunk to 4 layers of width 256, random
weights, SmolLM2's tokenizer; or a local model directory), the data (the demo orders task,
tunesmith.demo.orders, seed 0), the steps (examples-per-step examples each, seed 0, constant lr),
LoRA r=16 on all linear layers, and train.precision=auto (bf16 autocast on GPUs, fp32 on CPUs).
`--set` adds config overrides to both rows (e.g. --set train.micro_batch=batch).

Timing: tokens/s is real tokens (no padding) over the steps after the first `--warmup`, from the
run's metrics.jsonl (cumulative tokens and elapsed seconds at each step): compiling happens in the
first steps (tracing and building kernels, and once more at the first new sequence length, when
dynamo makes it dynamic), so the warm-up is reported apart, in seconds. `other CPU` is the CPU
other processes used meanwhile (in cores); rows above 0.1 are flagged. The losses of the two rows
must agree (compiling changes rounding, not training): the benchmark stops if their mean differs by
more than LOSS_TOL (relative).

Do not time on a shared machine: run it alone. Last line: `compile_speedup=<x>` (compiled tokens/s
over uncompiled, after the warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _machine import describe, machine_info
from _workers import busy_flag, parse_overrides, run_worker, worker_main

MODEL = "smollm2-135m-instruct"
LOSS_TOL = 0.02
SETTINGS = {"method.name": "lora", "method.r": 16, "method.alpha": 32, "train.lr": 2e-4, "train.schedule": "constant",
            "train.warmup_steps": 0, "train.seed": 0, "train.log_every": 1, "data.max_length": 512}


def tiny_model(out: Path) -> Path:
    """SmolLM2's config shrunk (its tokenizer, vocabulary and attention layout), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model

    base = resolve_model(MODEL).path
    config = AutoConfig.from_pretrained(base)
    config.update({"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 768,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def write_data(path: Path, n: int) -> Path:
    from tunesmith.demo.orders import make_splits

    path.write_text("".join(json.dumps(r) + "\n" for r in make_splits(0, {"train": n})["train"]))
    return path


def train_row(model: str, data: Path, out: Path, settings: dict, warmup: int) -> dict:
    """One row, in its own process: the run's tokens/s after the warm-up steps, and its losses."""
    from tunesmith.config import apply_overrides, parse_config
    from tunesmith.recipes.sft import run_sft
    from tunesmith.training.logging import read_metrics

    settings = {**settings, "model.name": model, "data.train": str(data), "run.output_dir": str(out),
                "run.name": "compiled" if settings.get("train.compile") else "plain"}
    run = run_sft(parse_config(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in settings.items()])))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    start, end = rows[warmup - 1], rows[-1]
    return {"tokens_per_s": (end["tokens"] - start["tokens"]) / (end["elapsed_s"] - start["elapsed_s"]),
            "warmup_s": start["elapsed_s"], "timed_steps": len(rows) - warmup, "losses": [r["loss"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local model directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the timing (compiling happens in them)")
    p.add_argument("--examples-per-step", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker_args)
        worker_main({"row": train_row}, "row", spec["model"], Path(spec["data"]), Path(spec["out"]),
                    spec["settings"], spec["warmup"])
        return
    if not 0 < args.warmup < args.steps:
        raise SystemExit("--warmup must be at least 1 and below --steps")
    print(describe(machine_info()), flush=True)

    with tempfile.TemporaryDirectory(prefix="compile-effect-") as tmp:
        tmp = Path(tmp)
        model = {"smollm2": MODEL, "tiny": None}.get(args.model, args.model)
        model = model or str(tiny_model(tmp / "tiny-model"))
        data = write_data(tmp / "train.jsonl", args.steps * args.examples_per_step)
        base = {**SETTINGS, "train.max_steps": args.steps, "train.batch_size": args.examples_per_step,
                **parse_overrides(args.set)}
        results = {}
        for label, compiled in (("uncompiled", False), ("compiled", True)):
            spec = {"model": model, "data": str(data), "out": str(tmp / label), "warmup": args.warmup,
                    "settings": {**base, "train.compile": compiled}}
            results[label] = r = run_worker(label, __file__, ["--worker", "row", "--worker-args", json.dumps(spec)],
                                            dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"))
            print(f"{label:>10}: {r['tokens_per_s']:8.1f} tokens/s over steps {args.warmup + 1}-{args.steps}; "
                  f"warm-up {r['warmup_s']:.1f} s for {args.warmup} steps; mean loss "
                  f"{sum(r['losses']) / len(r['losses']):.4f}; peak RSS {r['peak_rss_mb']:.0f} MB; "
                  f"other CPU {r['other_cores']:.2f} cores{busy_flag(r)}", flush=True)

    plain, compiled = (sum(results[k]["losses"]) / len(results[k]["losses"]) for k in ("uncompiled", "compiled"))
    if abs(compiled - plain) > LOSS_TOL * abs(plain):
        raise SystemExit(f"the compiled run trained differently: mean loss {compiled:.4f} vs {plain:.4f}")
    print(f"compile_speedup={results['compiled']['tokens_per_s'] / results['uncompiled']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
