"""Where a LoRA training step's CPU time goes: the profile behind the MFU that sft_vs_trl.py prints.

    python benchmarks/train_profile.py [--examples 8] [--rank 16] [--threads 1]

The same work as sft_vs_trl.py's tunesmith row, one thread per example (its default layout runs
two examples side by side on one thread each): the embedded SmolLM2-135M-Instruct, fp32, LoRA
r=16 alpha=32 on all linear layers (tunesmith's own builder), the first N GSM8K training rows as
chat prompt/completion, each example unpadded in its own forward and backward through
training.losses.sft_loss_sum (the LM head and cross-entropy on trained positions only).

It times the step (best of 3 after a warm-up), then runs one step under torch.profiler and
splits the ops' own CPU time into
  * base matmuls   the frozen linear layers (forward, and the activation gradients of backward),
  * LoRA matmuls   every product with a dimension equal to the rank (A and B, their gradients),
  * LM head        products with the vocabulary dimension (chunked, trained positions only),
  * attention      torch's fused scaled_dot_product_attention kernels (forward and backward),
  * elementwise    everything else the profiler timed (norms, RoPE, SiLU, adds, copies),
  * framework      wall time the ops do not account for (Python, autograd bookkeeping),
and prints each share with the rate its matmuls reached against the machine's single-thread fp32
matmul peak (a 2048x2048 product with the same thread count), so the shapes' own efficiency is
visible apart from everything around them. Last line: `mfu=<x> matmul_share=<y> lora_share=<z>`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _gsm8k import GSM8K
from _machine import cpu_info, cores, FLAGS, matmul_gflops

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def examples(tokenizer, n: int) -> list[dict]:
    """(input_ids, labels) rows: the chat-rendered GSM8K rows, trained on the answer only."""
    import torch

    from tunesmith.data.tokenize import encode_conversation

    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    out = []
    for i, r in enumerate(rows):
        enc = encode_conversation(tokenizer, [{"role": "user", "content": r["question"]},
                                              {"role": "assistant", "content": r["answer"]}], 512, f"gsm8k:{i + 1}")
        out.append({"input_ids": torch.tensor([enc.input_ids]), "labels": torch.tensor([enc.labels])})
    return out


def flops(model, batches, rank: int) -> float:
    """Model FLOPs of one step, as sft_vs_trl.py counts them: 2 per frozen weight per position
    forward plus 2 backward (activation gradients), LoRA weights 6 (they train), attention
    2*L*d per layer and position forward (x3 with backward), the head on trained positions only."""
    import torch

    from tunesmith.plan.shapes import ModelShape
    from tunesmith.plan.throughput import flops_per_token  # the formula `tunesmith plan` uses

    shape = ModelShape.from_config(model.config)
    lora = sum(rank * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
               if name.endswith("base_layer") and isinstance(mod, torch.nn.Linear))
    total = 0.0
    for b in batches:
        n = b["input_ids"].shape[1]
        trained = int((b["labels"][0, 1:] != -100).sum())
        # one sequence of n positions: causal attention over n, the head on its trained positions
        total += n * flops_per_token(shape, "lora", trained / n, n, adapter_params=lora)
    return total


def classify(key: str, shapes, rank: int, vocab: int) -> str:
    if key in ("aten::mm", "aten::addmm", "aten::bmm"):
        dims = {d for s in shapes for d in s}
        if vocab in dims:
            return "LM head"
        if rank in dims:
            return "LoRA matmuls"
        return "base matmuls"
    if "scaled_dot_product" in key:
        return "attention"
    return "elementwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (sft_vs_trl's default layout: 1 per example)")
    args = ap.parse_args()

    import torch
    from torch.profiler import profile

    torch.set_num_threads(args.threads)
    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.training.losses import sft_loss_sum

    name, flags = cpu_info()
    peak = matmul_gflops()
    print(f"machine: {cores()} cores, {name}, " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS)
          + f"; fp32 matmul {peak:.1f} GFLOP/s with {args.threads} thread(s) (2048x2048)", flush=True)
    resolved = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(resolved.path)
    torch.manual_seed(0)
    method = MethodSection(name="lora", r=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules="all-linear")
    model = get_method("lora").build(load_model(resolved.path), method)
    model.train()
    batches = examples(tokenizer, args.examples)

    def step():
        for b in batches:
            loss, _ = sft_loss_sum(model, b)
            loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    with profile(record_shapes=True) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    shares: dict[str, float] = {}
    mm_flops: dict[str, float] = {}
    vocab = model.config.vocab_size
    for e in prof.key_averages(group_by_input_shape=True):
        kind = classify(e.key, [s for s in e.input_shapes if s], args.rank, vocab)
        shares[kind] = shares.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        if e.key == "aten::mm" and len(e.input_shapes) >= 2 and e.input_shapes[0] and e.input_shapes[1]:
            (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
            mm_flops[kind] = mm_flops.get(kind, 0.0) + 2 * m * k * n * e.count
    profiled = sum(shares.values())
    shares["framework"] = max(0.0, wall - profiled)
    tokens = sum(b["input_ids"].numel() for b in batches)
    work = flops(model, batches, args.rank)
    mfu = work / best / 1e9 / peak
    print(f"step: {args.examples} examples, {tokens} tokens, {best:.2f} s ({tokens / best:.1f} tokens/s), "
          f"model {work / best / 1e9:.1f} GFLOP/s = MFU {mfu:.3f}; profiled step {wall:.2f} s")
    for kind in ("base matmuls", "LoRA matmuls", "LM head", "attention", "elementwise", "framework"):
        sec = shares.get(kind, 0.0)
        rate = f", matmuls at {mm_flops[kind] / sec / 1e9:.1f} GFLOP/s = {mm_flops[kind] / sec / 1e9 / peak:.2f} of peak" \
            if kind in mm_flops and sec else ""
        print(f"  {kind:13s} {sec:6.2f} s  {100 * sec / wall:5.1f} %{rate}")
    mat = sum(shares.get(k, 0.0) for k in ("base matmuls", "LoRA matmuls", "LM head")) / wall
    print(f"mfu={mfu:.3f} matmul_share={mat:.3f} lora_share={shares.get('LoRA matmuls', 0.0) / wall:.3f}")


if __name__ == "__main__":
    main()
