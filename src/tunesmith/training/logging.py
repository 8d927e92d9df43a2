"""Live progress on the terminal, metrics.jsonl in the run directory, and PNG plots."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl, plus a one-line progress report."""

    def __init__(self, path: Path, total_steps: int, stream=None, trackers=None):
        self.path = Path(path)
        self.trackers = trackers  # optional fan-out (TensorBoard, MLflow, W&B), see trackers.py
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.tokens = 0
        self.trained_tokens = 0
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **metrics) -> dict:
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "elapsed_s": round(elapsed, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(step, record)
        return record

    def count(self, tokens: int, trained: int) -> None:
        self.tokens += tokens
        self.trained_tokens += trained

    def progress(self, step: int, loss: float, lr: float) -> dict:
        elapsed = time.perf_counter() - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / step * (self.total_steps - step) if step else 0.0
        record = self.log(step, loss=round(loss, 6), lr=lr, tokens=self.tokens,
                          trained_tokens=self.trained_tokens, tokens_per_s=round(tps, 2))
        print(f"step {step:>5}/{self.total_steps}  loss {loss:7.4f}  lr {lr:.2e}  "
              f"{tps:7.1f} tok/s  ETA {_fmt_eta(eta)}", file=self.stream, flush=True)
        return record

    def close(self) -> None:
        self._file.close()
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per trained token")
    ax.set_title("tunesmith training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
