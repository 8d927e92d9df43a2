"""Calibrate plan/memory.py on this CPU: short real trainings of the embedded SmolLM2-135M, each one's
peak resident memory (VmHWM of the `tunesmith train` process, polled; the re-executed process with the
allocator keeps the pid) against `estimate_memory` for the same config.

    python benchmarks/plan_memory_probe.py [--only lora-256,full-256] [--steps 2] [--json out.json]

Every example is longer than max_length (texts joined from banking77), so every forward holds exactly
max_length tokens and the estimate's "longest sequence" is the one the run sees. Memory is not
distorted by other processes' CPU load (only time is), so the figures hold on a busy machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
if not DATA.exists():
    DATA = Path("/work/shared/data/banking77/train.csv")

BASE = {"model": {"name": "smollm2-135m-instruct"},
        "data": {"train": "train.jsonl", "train_on": "all", "max_length": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "log_every": 1}}

# name -> (overrides, data kind)
CASES = {
    "lora-256": ([], "text"),
    "lora-1024": (["data.max_length=1024"], "text"),
    "lora-1024-gc": (["data.max_length=1024", "train.gradient_checkpointing=true"], "text"),
    "lora-1024-budget": (["data.max_length=1024", "train.activation_memory_mb=150"], "text"),
    "full-256": (["method.name=full"], "text"),
    "full-1024-gc": (["method.name=full", "data.max_length=1024", "train.gradient_checkpointing=true"], "text"),
    "dpo-lora-512": (["objective.name=dpo", "data.max_length=512", "train.batch_size=1"], "pairs"),
    "qlora-256": (["method.name=qlora"], "text"),
    "lora-512-dropout": (["data.max_length=512", "method.dropout=0.1"], "text"),
    "lora-512-eager": (["data.max_length=512", "model.attn_implementation=eager"], "text"),
    "full-1024": (["method.name=full", "data.max_length=1024"], "text"),
}


def _texts() -> list[str]:
    with open(DATA, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def write_data(path: Path, kind: str, n: int = 8) -> None:
    texts = _texts()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            chunk = " ".join(texts[i * 200:(i + 1) * 200])  # ~3000 tokens: longer than any max_length here
            if kind == "text":
                rec = {"text": chunk}
            else:  # a short prompt, two long replies: both sides truncated to max_length
                rec = {"prompt": texts[i], "chosen": chunk, "rejected": " ".join(reversed(chunk.split()))}
            f.write(json.dumps(rec) + "\n")


def peak_rss(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> tuple[int, int, float]:
    """(peak RSS in bytes of the process and its children, exit code, seconds)."""
    import psutil

    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            total = 0
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    status = Path(f"/proc/{p.pid}/status").read_text()
                    total += int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
                except (OSError, StopIteration, psutil.Error):
                    pass
            peak = max(peak, total)
            time.sleep(0.05)
    return peak, proc.returncode, time.perf_counter() - start


def estimate(cfg_path: Path, overrides: list[str], kind: str):
    from tunesmith.config import load_config
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.plan.devices import Device
    from tunesmith.plan.memory import estimate_memory
    from tunesmith.plan.params import count_parameters
    from tunesmith.plan.shapes import ModelShape, model_config
    from tunesmith.plan.workload import resolve_workload
    import psutil

    cfg = load_config(cfg_path, overrides)
    config, _ = model_config(cfg.model.name)
    shape = ModelShape.from_config(config)
    counts = count_parameters(config, cfg.method)
    device = Device("cpu", "cpu", psutil.virtual_memory().total, source="given")
    L = cfg.data.max_length
    trained = L
    if kind == "pairs":  # the prompt is not trained
        tok = load_tokenizer(resolve_model(cfg.model.name).path)
        trained = L - len(tok(_texts()[0])["input_ids"]) - 8
    w = resolve_workload(cfg, device, seq_len=L, model_config=config, trained_len=trained, data_tokens=8 * L * (2 if kind == "pairs" else 1))
    return estimate_memory(shape, counts, w, device), w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in ("text", "pairs"):
            write_data(tmp / f"{kind}.jsonl", kind)
        for name in names:
            overrides, kind = CASES[name]
            cfg = json.loads(json.dumps(BASE))
            cfg["data"]["train"] = f"{kind}.jsonl"
            if kind == "pairs":  # preference training scores the replies only
                del cfg["data"]["train_on"]
            cfg["train"]["max_steps"] = args.steps
            cfg["run"] = {"name": name, "output_dir": str(tmp / "runs")}
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            cmd = [sys.executable, "-m", "tunesmith", "train", f"{name}.yaml", *overrides]
            measured, rc, secs = peak_rss(cmd, tmp, tmp / f"{name}.log", env)
            if rc != 0:
                print(f"{name}: failed (exit {rc}):\n" + (tmp / f"{name}.log").read_text()[-2000:])
                continue
            est, w = estimate(tmp / f"{name}.yaml", overrides, kind)
            err = est.total / measured - 1
            rows.append({"case": name, "cmd": " ".join(cmd[1:]), "estimated": est.total, "measured": measured,
                         "error": round(err, 4), "seconds": round(secs, 1),
                         "components": est.components, "notes": list(est.notes)})
            comp = " ".join(f"{k}={v / 2**20:.0f}" for k, v in est.components.items() if v)
            print(f"{name:18s} est {est.total / 2**20:7.0f} MiB  measured {measured / 2**20:7.0f} MiB  "
                  f"error {err:+.1%}  ({secs:.0f} s)  [{comp}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if rows:
        print(f"max_memory_error={max(abs(r['error']) for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
