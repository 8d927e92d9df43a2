"""tunesmith DPO vs TRL DPOTrainer (+PEFT) on the same model, pairs, lengths, batch and LoRA config.

    python benchmarks/dpo_vs_trl.py [--pairs 48]

Each tool runs in a fresh process (peak RSS is its own) on the embedded SmolLM2-135M with the
first hh-rlhf helpful-base test pairs (../shared/data), sigmoid DPO (beta 0.1), LoRA r=16 on all
linear layers, the reference being the base with the adapter disabled in both tools, fp32 on this
CPU, no gradient checkpointing, one epoch. Tokens are counted once from tunesmith's encoding of
the same pairs (prompt + chosen + prompt + rejected) and divided by each tool's training time.
Last line: `ratio tokens_per_s=<x> peak_rss=<y>` (tunesmith / TRL).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
MAX_LENGTH, BATCH, LR, BETA = 512, 4, 5e-5, 0.1


def write_pairs(path: Path, n: int) -> None:
    """Conversational prompt/chosen/rejected, built by tunesmith's own hh-rlhf parser."""
    from tunesmith.data.formats import normalise

    out = []
    with gzip.open(HH, "rt") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if rec["chosen"] == rec["rejected"]:
                continue
            (ex,) = normalise(rec, "auto", f"{HH}:{i + 1}")
            out.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
            if len(out) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tunesmith_worker(data: Path, out: Path) -> dict:
    from tunesmith.config import parse_config
    from tunesmith.recipes.dpo import run_dpo

    cfg = parse_config({"data": {"train": str(data), "max_length": MAX_LENGTH},
                        "method": {"name": "lora", "r": 16, "alpha": 32},
                        "objective": {"name": "dpo", "loss": "sigmoid", "beta": BETA},
                        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "schedule": "constant", "log_every": 4},
                        "run": {"name": "bench", "output_dir": str(out)}})
    m = json.loads((run_dpo(cfg) / "manifest.json").read_text())
    return {"seconds": m["train_seconds"], "tokens": m["tokens"]}


def trl_worker(data: Path, out: Path) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=BATCH, learning_rate=LR,
                     lr_scheduler_type="constant", num_train_epochs=1, max_length=MAX_LENGTH, beta=BETA,
                     loss_type="sigmoid", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     logging_steps=4, save_strategy="no", report_to=[], dataloader_num_workers=0)
    trainer = DPOTrainer(model=load_model(path), args=args, processing_class=load_tokenizer(path),
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t0}


def run_worker(tool: str, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--data", str(data), "--out", str(out)]
    from tunesmith.training.allocator import allocator_env

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # tunesmith's worker starts the way `tunesmith train` restarts itself (train.allocator auto);
    # TRL's as users run it (glibc's allocator) unless --trl-allocator says otherwise.
    env = allocator_env("auto" if tool == "tunesmith" else TRL_ALLOCATOR[0], env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{tool} worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"allocator": env["TUNESMITH_ALLOCATOR"]}


TRL_ALLOCATOR = ["system"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--trl-allocator", default="system", choices=["system", "tcmalloc", "jemalloc", "mimalloc"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        result = (tunesmith_worker if args.worker == "tunesmith" else trl_worker)(args.data, args.out)
        print(json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))
        return
    TRL_ALLOCATOR[0] = args.trl_allocator
    if not HH.is_file():
        raise SystemExit(f"{HH} is missing: the benchmark needs ../shared/data")
    from tunesmith.models.registry import resolve_model

    resolve_model("smollm2-135m-instruct")  # convert once, outside either tool's timing
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data, args.pairs)
        res = {tool: run_worker(tool, data, Path(tmp)) for tool in ("trl", "tunesmith")}
    tokens = res["tunesmith"]["tokens"]
    print(f"sigmoid DPO, {args.pairs} hh-rlhf pairs, batch {BATCH}, max length {MAX_LENGTH}, {tokens} tokens")
    print(f"{'tool':<10}{'seconds':>9}{'tok/s':>8}{'peak RSS MB':>12}  allocator")
    for tool, r in res.items():
        r["tps"] = tokens / r["seconds"]
        print(f"{tool:<10}{r['seconds']:>9.1f}{r['tps']:>8.1f}{r['peak_rss_mb']:>12.0f}  {r['allocator']}")
    ours, trl = res["tunesmith"], res["trl"]
    print(f"ratio tokens_per_s={ours['tps'] / trl['tps']:.2f} peak_rss={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
