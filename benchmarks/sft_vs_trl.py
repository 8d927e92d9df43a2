"""tunesmith vs TRL SFTTrainer (+PEFT) on the same model, data, lengths, batch and LoRA config.

    python benchmarks/sft_vs_trl.py [--method lora|full] [--examples 96]
        [--trl KEY=VALUE ...] [--tunesmith a.b=VALUE ...] [--only trl|tunesmith]

What is the same for both tools
  * model: the embedded SmolLM2-135M-Instruct, fp32 (bf16 is emulated on this CPU, 8-13x slower);
  * data: the first N GSM8K training rows (../shared/data) as conversational prompt/completion
    records; both render them with the model's chat template and train on the completion only;
  * max length 512, one epoch, AdamW lr 2e-4 with a constant schedule and no warmup, gradient
    clipping at 1.0, no weight decay, seed 0; LoRA r=16, alpha=32, dropout 0, all linear layers;
  * effective batch: 8 examples per optimizer step (EXAMPLES_PER_STEP). TRL's best configuration
    here does not pack (see TRL_BEST), so it is 8 examples per step for both; when TRL packs
    (--trl packing=true), a step is PACKED_ROWS_PER_STEP rows of <= 512 tokens, ~9 of these
    examples (~221 tokens each), and the table's tokens/step column shows how close that is;
  * each tool runs in its own fresh process, one after the other, so peak RSS (ru_maxrss) is its
    own; its tokens/s is real tokens (no padding) over the wall time of its training loop
    (tunesmith: the run's train_seconds; TRL: trainer.train()), which includes optimizer
    creation and, if used, compilation, but not model loading, tokenisation or saving.

Both tools' token counts are taken from what they actually fed the model: TRL's data collator is
wrapped to count real tokens and trained targets (labels after the one-token shift), tunesmith
reports them in its manifest. The machine is shared, so each worker's wall time is printed with
the CPU time other processes used meanwhile (`other CPU`): a measurement taken while something
else ran is flagged, not silently trusted.

MFU is tunesmith's achieved model FLOP/s over this machine's fp32 matmul rate (best of several
2048x2048 products, measured here, both threads). Model FLOPs per token: 2 per weight of every
linear layer in the forward, 2 more in the backward for the activation gradients, and 2 more for
the weight gradients only where the weights train (full fine-tuning); the LM head counts only for
trained positions (the only ones the loss needs); causal attention adds 2*L*d per layer and token
forward (x3 with backward). Frozen embeddings are a lookup, not FLOPs.

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
EXAMPLES_PER_STEP = 8      # effective batch, in examples
PACKED_ROWS_PER_STEP = 4   # effective batch when TRL packs: 4 rows of <= 512 tokens ~ 9 examples here
MAX_LENGTH = 512
LR = 2e-4
SEED = 0

# TRL's fastest configuration on this 2-core CPU, from the exploration in the report (--trl
# overrides any of it): packing on forces padding-free rows, whose block-diagonal attention mask
# costs more than it saves here; one unpadded example per forward (batch 1, accumulation 8) keeps
# sdpa on its causal kernel with no mask and the least activation memory; gradient checkpointing
# only slows it down (it recomputes the forward) and is reported separately for memory.
TRL_BEST = {"packing": False, "padding_free": False, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 8, "gradient_checkpointing": False}
# tunesmith's configurations: the user-facing batch (8 examples a step) and its defaults (its
# allocator included: `tunesmith train` preloads tcmalloc/jemalloc/mimalloc, training/allocator.py),
# once as they are ("tunesmith-fast": two examples at a time on one thread each) and once with an
# activation budget ("tunesmith": one example at a time on both threads, recomputing the layers
# that a long example needs to keep 250 MB of activations). The ratio line is tunesmith's.
TUNESMITH = {"train.batch_size": EXAMPLES_PER_STEP, "train.grad_accum": 1, "train.parallel_examples": 1,
             "train.activation_memory_mb": 250}
TUNESMITH_FAST = {"train.batch_size": EXAMPLES_PER_STEP, "train.grad_accum": 1}


def write_data(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}],
                                "completion": [{"role": "assistant", "content": r["answer"]}]}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        out[key] = yaml.safe_load(raw)
    return out


# --- workers (each in its own process) -------------------------------------------------------------

def tunesmith_worker(data: Path, method: str, out: Path, overrides: dict) -> dict:
    from tunesmith.config import apply_overrides, parse_config
    from tunesmith.recipes.sft import run_sft

    cfg = {"data": {"train": str(data), "max_length": MAX_LENGTH},
           "method": {"name": method, **LORA},
           "train": {"epochs": 1, "lr": LR, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                     "weight_decay": 0.0, "seed": SEED, "log_every": 1, "precision": "fp32"},
           "run": {"name": "bench", "output_dir": str(out)}}
    settings = {**(TUNESMITH_FAST if os.environ.get("TUNESMITH_BENCH_FAST") else TUNESMITH), **overrides}
    cfg = parse_config(apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    run = run_sft(cfg)
    m = json.loads((run / "manifest.json").read_text())
    return {"tokens": m["tokens"], "trained_tokens": m["trained_tokens"], "seconds": m["train_seconds"],
            "steps": m["steps"], "examples": m["data"]["train_examples"], "final_loss": m["final_loss"],
            "trainable": m["parameters"]["trainable"], "total_params": m["parameters"]["total"],
            "settings": settings}


class CountingCollator:
    """Wraps TRL's collator to count what the model is actually fed."""

    def __init__(self, inner):
        self.inner, self.tokens, self.trained, self.batches, self.widths = inner, 0, 0, 0, []

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int((batch["position_ids"] >= 0).sum())
        self.trained += int((batch["labels"][:, 1:] != -100).sum())
        self.batches += 1
        self.widths.append(ids.numel())
        return batch


def trl_worker(data: Path, method: str, out: Path, overrides: dict) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    model, tok = load_model(path), load_tokenizer(path)
    ds = load_dataset("json", data_files=str(data), split="train")
    settings = {**TRL_BEST, **overrides}
    if settings.get("packing") and not {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(overrides):
        settings.update(per_device_train_batch_size=1, gradient_accumulation_steps=PACKED_ROWS_PER_STEP)
    args = SFTConfig(**{**dict(
        output_dir=str(out / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        num_train_epochs=1, max_length=MAX_LENGTH, max_grad_norm=1.0, weight_decay=0.0, seed=SEED, bf16=False,
        fp16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], completion_only_loss=True,
        dataloader_num_workers=0), **settings})
    peft_cfg = None if method == "full" else LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM", bias="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    t0 = time.perf_counter()
    out_ = trainer.train()
    seconds = time.perf_counter() - t0
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    return {"tokens": counter.tokens, "trained_tokens": counter.trained, "seconds": seconds,
            "steps": trainer.state.global_step, "examples": len(ds), "final_loss": out_.training_loss,
            "trainable": n_train, "total_params": n_total, "settings": settings,
            "padded_tokens": sum(counter.widths), "torch_threads": torch.get_num_threads()}


# --- measurement -----------------------------------------------------------------------------------

def matmul_gflops(n: int = 2048, rounds: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        best = max(best, 2 * n ** 3 * 5 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_token(method: str, trained_share: float, mean_len: float) -> float:
    """Model FLOPs per token of SmolLM2-135M (see the module docstring)."""
    from transformers import AutoConfig

    from tunesmith.models.registry import resolve_model

    c = AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    head = c.vocab_size * d * trained_share
    passes = 6 if method == "full" else 4  # forward 2, activation grads 2, weight grads 2 (full only)
    attention = 3 * layers * 2 * mean_len * d  # causal: 2*L*d forward per token and layer, x3 with backward
    return passes * (linear + head) + attention


def system_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def worker_env(tool: str, overrides: list[str], trl_allocator: str) -> dict:
    """tunesmith's worker starts the way `tunesmith train` restarts itself (with train.allocator,
    default auto); TRL's with glibc's allocator as users run it, or --trl-allocator's."""
    from tunesmith.training.allocator import allocator_env

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TUNESMITH_BENCH_FAST", None)
    if tool == "tunesmith-fast":
        env["TUNESMITH_BENCH_FAST"] = "1"
    if tool == "trl":
        return allocator_env(trl_allocator, env)
    choice = parse_overrides(overrides).get("train.allocator", "auto")
    return allocator_env(choice, env)


def run_worker(tool: str, data: Path, method: str, out: Path, overrides: list[str], trl_allocator: str) -> dict:
    kind = "trl" if tool == "trl" else "tunesmith"
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--method", method, "--out", str(out / tool)]
    cmd += [x for o in overrides for x in (f"--{kind}", o)]
    env = worker_env(tool, overrides, trl_allocator)
    busy0, own0, wall0 = system_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    own1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), system_busy_seconds()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{tool} worker failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    result["allocator"] = env.get("TUNESMITH_ALLOCATOR", "system")
    result["process_seconds"] = time.perf_counter() - wall0
    result["cpu_seconds"] = own
    result["other_cpu_seconds"] = max(0.0, (busy1 - busy0) - own)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="SFTConfig override")
    ap.add_argument("--tunesmith", action="append", default=[], metavar="a.b=VALUE", help="config override")
    ap.add_argument("--only", choices=["trl", "tunesmith", "tunesmith-fast"])
    ap.add_argument("--no-fast", action="store_true", help="skip the tunesmith-fast row")
    ap.add_argument("--trl-allocator", default="system", choices=["system", "tcmalloc", "jemalloc", "mimalloc"],
                    help="allocator TRL's process starts with (default: glibc's, as `python train.py` runs)")
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        fn = tunesmith_worker if args.worker == "tunesmith" else trl_worker
        result = fn(args.data, args.method, args.out, parse_overrides(getattr(args, args.worker)))
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    if not GSM8K.is_file():
        raise SystemExit(f"{GSM8K} is missing: the benchmark needs ../shared/data")
    from tunesmith.models.registry import resolve_model

    resolve_model("smollm2-135m-instruct")  # convert once, outside either tool's timing
    tools = [args.only] if args.only else ["trl", "tunesmith", *([] if args.no_fast else ["tunesmith-fast"])]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k.jsonl"
        write_data(data, args.examples)
        rate = matmul_gflops()
        res = {t: run_worker(t, data, args.method, Path(tmp), getattr(args, "trl" if t == "trl" else "tunesmith"),
                             args.trl_allocator) for t in tools}
    print(f"method {args.method}, {args.examples} GSM8K examples, max length {MAX_LENGTH}, 1 epoch, "
          f"fp32 matmul {rate:.1f} GFLOP/s, load average before {load[0]:.2f} after {os.getloadavg()[0]:.2f}")
    for tool, r in res.items():
        print(f"  {tool}: {json.dumps(r['settings'])}; allocator {r['allocator']}; trainable {r['trainable']:,} of {r['total_params']:,}; "
              f"final loss {r['final_loss']:.4f}")
    print(f"{'tool':<15}{'steps':>6}{'tok/step':>9}{'tokens':>8}{'trained':>8}{'train s':>8}{'tok/s':>7}"
          f"{'trained/s':>10}{'peak RSS MB':>12}{'process s':>10}{'other CPU':>10}")
    for tool, r in res.items():
        r["tps"] = r["tokens"] / r["seconds"]
        other = r["other_cpu_seconds"] / r["process_seconds"]  # in cores, while this worker ran
        flag = "  <- machine busy" if other > 0.1 else ""
        print(f"{tool:<15}{r['steps']:>6}{r['tokens'] / r['steps']:>9.0f}{r['tokens']:>8}{r['trained_tokens']:>8}"
              f"{r['seconds']:>8.1f}{r['tps']:>7.1f}{r['trained_tokens'] / r['seconds']:>10.1f}"
              f"{r['peak_rss_mb']:>12.0f}{r['process_seconds']:>10.1f}{other:>9.2f}c{flag}")
    if "trl" not in res or "tunesmith" not in res:
        return
    ours, trl = res["tunesmith"], res["trl"]
    if "tunesmith-fast" in res:
        fast = res["tunesmith-fast"]
        print(f"tunesmith-fast / TRL: tokens_per_s={fast['tps'] / trl['tps']:.2f} "
              f"peak_rss={fast['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
    fpt = flops_per_token(args.method, ours["trained_tokens"] / ours["tokens"], ours["tokens"] / ours["examples"])
    mfu = ours["tps"] * fpt / (rate * 1e9)
    print(f"tunesmith: {fpt / 1e6:.0f} MFLOP/token -> {ours['tps'] * fpt / 1e9:.1f} GFLOP/s; "
          f"TRL: {trl['tps'] * fpt / 1e9:.1f} GFLOP/s (same count)")
    print(f"ratio tokens_per_s={ours['tps'] / trl['tps']:.2f} "
          f"peak_rss={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
