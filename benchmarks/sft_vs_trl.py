"""tunesmith vs TRL SFTTrainer (+PEFT) on the same model, data, lengths, batch and LoRA config.

    python benchmarks/sft_vs_trl.py [--method lora|full] [--examples 96]

Each tool runs in its own fresh process (so peak RSS is its own), on the embedded SmolLM2-135M,
the same GSM8K prompt/completion examples (../shared/data, chat template applied, loss on the
completion only), max length 512, and one epoch. TRL is configured at its best for this CPU:
fp32 (bf16 is emulated and 8-13x slower here), packing on, no gradient checkpointing.
Last line: `ratio tokens_per_s=<x> peak_rss=<y> mfu=<z>` (tunesmith / TRL; mfu is tunesmith's own).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
EFFECTIVE_BATCH = 8   # examples per optimizer step (TRL: packed rows per step, see trl_worker)
MAX_LENGTH = 512
LR = 2e-4


def write_data(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}],
                                "completion": [{"role": "assistant", "content": r["answer"]}]}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tunesmith_worker(data: Path, method: str, out: Path) -> dict:
    from tunesmith.config import parse_config
    from tunesmith.recipes.sft import run_sft

    cfg = parse_config({
        "data": {"train": str(data), "max_length": MAX_LENGTH, "packing": True},
        "method": {"name": method, **LORA},
        "train": {"epochs": 1, "batch_size": EFFECTIVE_BATCH, "lr": LR, "schedule": "constant", "log_every": 4},
        "run": {"name": "bench", "output_dir": str(out)}})
    run = run_sft(cfg)
    m = json.loads((run / "manifest.json").read_text())
    return {"tokens": m["tokens"], "trained_tokens": m["trained_tokens"], "seconds": m["train_seconds"],
            "trainable": m["parameters"]["trainable"], "total_params": m["parameters"]["total"]}


def trl_worker(data: Path, method: str, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    model, tok = load_model(path), load_tokenizer(path)
    ds = load_dataset("json", data_files=str(data), split="train")
    # Packed rows of 512 tokens: ~3 rows hold the 8 examples (~180 tokens each) of one step.
    args = SFTConfig(output_dir=str(out / "trl"), per_device_train_batch_size=3, gradient_accumulation_steps=1,
                     learning_rate=LR, lr_scheduler_type="constant", num_train_epochs=1, max_length=MAX_LENGTH,
                     packing=True, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     logging_steps=4, save_strategy="no", report_to=[], completion_only_loss=True,
                     dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    peft_cfg = None if method == "full" else LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    labels = [sum(1 for x in row["completion_mask"] if x) for row in trainer.train_dataset] \
        if "completion_mask" in trainer.train_dataset.column_names else None
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    return {"tokens": tokens, "trained_tokens": sum(labels) if labels else None, "seconds": seconds,
            "trainable": n_train, "total_params": n_total, "torch_threads": torch.get_num_threads()}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def model_flops_per_token(total_params: int, trainable: int, method: str) -> float:
    """Forward 2N; backward 2N for activation gradients, +2N for weight gradients when the
    weights themselves train (full). LoRA's own weights are a rounding error."""
    return (6 if method == "full" else 4) * total_params


def run_worker(tool: str, data: Path, method: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--data", str(data), "--method", method, "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{tool} worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        fn = tunesmith_worker if args.worker == "tunesmith" else trl_worker
        result = fn(args.data, args.method, args.out)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    if not GSM8K.is_file():
        raise SystemExit(f"{GSM8K} is missing: the benchmark needs ../shared/data")
    from tunesmith.models.registry import resolve_model

    resolve_model("smollm2-135m-instruct")  # convert once, outside either tool's timing
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k.jsonl"
        write_data(data, args.examples)
        rate = matmul_gflops()
        res = {tool: run_worker(tool, data, args.method, Path(tmp)) for tool in ("trl", "tunesmith")}
    print(f"method {args.method}, {args.examples} GSM8K examples, max length {MAX_LENGTH}, "
          f"fp32 matmul {rate:.1f} GFLOP/s")
    print(f"{'tool':<10}{'tokens':>8}{'trained':>9}{'seconds':>9}{'tok/s':>8}{'trained/s':>10}{'peak RSS MB':>12}")
    for tool, r in res.items():
        r["tps"] = r["tokens"] / r["seconds"]
        trained = r["trained_tokens"] or 0
        print(f"{tool:<10}{r['tokens']:>8}{trained:>9}{r['seconds']:>9.1f}{r['tps']:>8.1f}"
              f"{trained / r['seconds']:>10.1f}{r['peak_rss_mb']:>12.0f}")
    ours = res["tunesmith"]
    mfu = ours["tps"] * model_flops_per_token(ours["total_params"], ours["trainable"], args.method) / (rate * 1e9)
    print(f"ratio tokens_per_s={ours['tps'] / res['trl']['tps']:.2f} "
          f"peak_rss={ours['peak_rss_mb'] / res['trl']['peak_rss_mb']:.2f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
