"""Scaling out: 1 process vs 2 (or N GPUs), the same run, through the real `tunesmith train`.

    python benchmarks/scaling.py [--steps 6] [--full-steps 3] [--examples 64] [--rows lora-1p,lora-2p,...]

Every row trains the same config (the embedded SmolLM2-135M-Instruct, the first GSM8K training rows
from ../shared/data as prompt/completion, max length 384, 8 examples per step, seed 0) as its own
`python -m tunesmith train` (with --nproc 2 for the 2-process rows), one after the other. Since the
step's batch is the same whatever the number of processes, every row trains the same steps on the
same examples; the benchmark stops if the rows' losses disagree (relative LOSS_TOL), because equal
speed claims need equal learning.

On a CPU the honest comparison is the same cores either way: 1 process with 2 threads against
2 processes of 1 thread each (both printed, with 1 process of 1 thread as the per-core
reference). With N >= 2 GPUs the rows are 1 GPU against N GPUs instead.

Rows
  lora-1p / lora-1p-1t / lora-2p      LoRA (r 16, all linear), DDP for 2 processes
  full-1p / full-2p-ddp / full-2p-ddp-1bucket / full-2p-fsdp
                                      full fine-tuning: DDP with 25 MB buckets all-reduced while the
                                      backward runs, DDP with one bucket (all-reduce after the
                                      backward, no overlap: what tunesmith did before DDP), and FSDP2

Figures: tokens/s (real tokens over the training loop's wall time, the manifest's train_seconds),
tokens/s per rank, scaling efficiency (2-process tokens/s over the 1-process 2-thread tokens/s on a
CPU; over N x the 1-GPU tokens/s on GPUs), peak RSS of the largest process (each row run under its own
waiting parent, so the figure is its own), and rank 0's bytes of weights + optimizer state (the
manifest's memory_rank0: its shards under FSDP). Last line:
    scaling_efficiency_2=<x> fsdp_memory_per_rank_ratio=<y>
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _gsm8k import write_data
from _machine import machine_line

MODEL = "smollm2-135m-instruct"
LOSS_TOL = 2e-3  # relative; the same steps on 1 or 2 ranks differ only in summation order

ROWS = {  # name: (method, processes, threads per process, overrides)
    "lora-1p": ("lora", 1, 2, []),
    "lora-1p-1t": ("lora", 1, 1, []),
    "lora-2p": ("lora", 2, 1, ["train.distributed.strategy=ddp"]),
    "full-1p": ("full", 1, 2, []),
    "full-2p-ddp": ("full", 2, 1, ["train.distributed.strategy=ddp"]),
    "full-2p-ddp-1bucket": ("full", 2, 1, ["train.distributed.strategy=ddp", "train.distributed.bucket_mb=100000"]),
    "full-2p-fsdp": ("full", 2, 1, ["train.distributed.strategy=fsdp"]),
}


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def run_row(name: str, data: Path, out: Path, steps: int) -> dict:
    method, procs, threads, extra = ROWS[name]
    n_gpu = gpus()
    if n_gpu >= 2 and procs > 1:
        procs = n_gpu  # on a GPU machine: 1 GPU vs all of them
    overrides = [f"model.name={MODEL}", f"data.train={data}", "data.max_length=384", f"method.name={method}",
                 f"train.max_steps={steps}", "train.batch_size=8", "train.grad_accum=1", "train.lr=1e-4",
                 "train.schedule=constant", "train.seed=0", "train.log_every=1", "train.precision=fp32",
                 f"run.output_dir={out}", f"run.name={name}", *extra]
    if method == "lora":
        overrides += ["method.r=16", "method.alpha=32", "method.dropout=0.0"]
    config = out.parent / "empty.yaml"  # everything is in the overrides
    config.write_text("{}\n")
    cmd = [sys.executable, "-m", "tunesmith", "train", str(config), *overrides, *(["--nproc", str(procs)] if procs > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd.append(f"train.threads={threads}")
    # a waiting parent per row: RUSAGE_CHILDREN's max RSS is then this row's largest process
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("MAXRSS")))
    run = out / name
    m = json.loads((run / "manifest.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    mem = m["memory_rank0"]
    return {"name": name, "procs": m["processes"], "threads": threads, "tokens": m["tokens"],
            "seconds": m["train_seconds"], "tps": m["tokens"] / m["train_seconds"], "losses": losses,
            "rss_gb": rss_kb / 2**20, "state_gb": (mem["trained_weights"] + mem["frozen_weights"]
                                                   + mem["optimizer_state"]) / 2**30,
            "strategy": next((line.split(":")[0] for line in done.stdout.splitlines()
                              if line.startswith("strategy ")), "?")}


def check_same_learning(rows: list[dict]) -> None:
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(ROWS[r["name"]][0], []).append(r)
    for method, group in by_method.items():
        ref = group[0]
        for r in group[1:]:
            worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(r["losses"], ref["losses"]))
            if len(r["losses"]) != len(ref["losses"]) or worst > LOSS_TOL:
                raise SystemExit(f"{r['name']} and {ref['name']} did not learn the same ({method}): losses "
                                 f"{r['losses']} vs {ref['losses']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of the LoRA rows")
    ap.add_argument("--full-steps", type=int, default=3, help="optimizer steps of the full fine-tuning rows")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    print(machine_line(), flush=True)
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k.jsonl"
        write_data(data, args.examples)
        for name in names:
            steps = args.steps if ROWS[name][0] == "lora" else args.full_steps
            rows.append(run_row(name, data, Path(tmp) / "runs", steps))
            r = rows[-1]
            print(f"{r['name']:<22} {r['procs']} proc x {r['threads']} thr  {r['tps']:7.1f} tok/s  "
                  f"{r['tps'] / r['procs']:7.1f} tok/s/rank  peak RSS {r['rss_gb']:.2f} GB  "
                  f"rank-0 weights+optimizer {r['state_gb']:.3f} GB  {r['strategy']}  "
                  f"losses {[round(x, 4) for x in r['losses']]}", flush=True)
    check_same_learning(rows)
    got = {r["name"]: r for r in rows}
    eff = mem = float("nan")
    if "lora-2p" in got and "lora-1p" in got:
        one, two = got["lora-1p"], got["lora-2p"]
        # CPU: the same 2 cores either way; GPUs: N GPUs against N x one GPU
        eff = two["tps"] / (one["tps"] * (two["procs"] if gpus() >= 2 else 1))
        print(f"LoRA: 2 processes x 1 thread vs 1 process x 2 threads: {eff:.2f}x tokens/s"
              + (f"; vs 2 x (1 process x 1 thread): {two['tps'] / (2 * got['lora-1p-1t']['tps']):.2f}"
                 if "lora-1p-1t" in got else ""))
    if "full-2p-ddp" in got and "full-2p-ddp-1bucket" in got:
        a, b = got["full-2p-ddp"], got["full-2p-ddp-1bucket"]
        print(f"full fine-tuning DDP: 25 MB buckets overlapped with the backward {a['tps']:.1f} tok/s vs one "
              f"all-reduce after the backward {b['tps']:.1f} tok/s ({a['tps'] / b['tps']:.2f}x)")
    if "full-2p-fsdp" in got and "full-1p" in got:
        mem = got["full-2p-fsdp"]["state_gb"] / got["full-1p"]["state_gb"]
        print(f"full fine-tuning FSDP2: rank-0 weights+optimizer {got['full-2p-fsdp']['state_gb']:.3f} GB vs "
              f"1 process {got['full-1p']['state_gb']:.3f} GB ({mem:.2f}x); peak RSS "
              f"{got['full-2p-fsdp']['rss_gb']:.2f} vs {got['full-1p']['rss_gb']:.2f} GB")
    print(f"scaling_efficiency_2={eff:.3f} fsdp_memory_per_rank_ratio={mem:.3f}")


if __name__ == "__main__":
    main()
