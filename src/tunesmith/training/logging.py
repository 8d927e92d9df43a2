"""Live progress on the terminal, metrics.jsonl in the run directory, and PNG plots."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


SHOWN = ("reward", "kl")  # per-step metrics a recipe may log that also go on the console line


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl, plus a one-line progress report."""

    def __init__(self, path: Path | None, total_steps: int, stream=None, trackers=None):
        """path None: count only, write and print nothing (a rank other than 0)."""
        self.path = Path(path) if path is not None else None
        self.trackers = trackers  # optional fan-out (TensorBoard, MLflow, W&B), see trackers.py
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.tokens = 0
        self.trained_tokens = 0
        self._file = open(self.path, "a", encoding="utf-8") if self.path is not None else None

    def log(self, step: int, **metrics) -> dict:
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "elapsed_s": round(elapsed, 3), **metrics}
        if self._file is None:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(step, record)
        return record

    def count(self, tokens: int, trained: int) -> None:
        self.tokens += tokens
        self.trained_tokens += trained

    def resume_at(self, step: int, tokens: int, trained_tokens: int) -> None:
        """Continue counts from a checkpoint; speed and ETA count only this process's work."""
        self.tokens, self.trained_tokens = tokens, trained_tokens
        self._base_step, self._base_tokens = step, tokens

    def progress(self, step: int, loss: float, lr: float, **extra) -> dict:
        elapsed = time.perf_counter() - self.start
        base_step, base_tokens = getattr(self, "_base_step", 0), getattr(self, "_base_tokens", 0)
        tps = (self.tokens - base_tokens) / elapsed if elapsed > 0 else 0.0
        done = step - base_step
        eta = elapsed / done * (self.total_steps - step) if done else 0.0
        record = self.log(step, loss=round(loss, 6), lr=lr, tokens=self.tokens,
                          trained_tokens=self.trained_tokens, tokens_per_s=round(tps, 2), **extra)
        if self._file is not None:
            shown = "".join(f"  {k} {extra[k]:.4f}" for k in SHOWN if k in extra)
            print(f"step {step:>5}/{self.total_steps}  loss {loss:7.4f}  lr {lr:.2e}{shown}  "
                  f"{tps:7.1f} tok/s  ETA {_fmt_eta(eta)}", file=self.stream, flush=True)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """Loss (train and validation), learning rate and gradient norm against the step; preference
    runs (DPO and its family) get a fourth panel: train and held-out preference accuracy, and the
    reward margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key):
        return [(r["step"], r[key]) for r in rows if key in r]

    preference = any("rewards/margins" in r or "val_preference_accuracy" in r for r in rows)
    online = any("val_reward" in r or "reward" in r for r in rows)  # online RL: reward and KL
    fig, axes = plt.subplots(4 if preference or online else 3, 1, figsize=(7, 10.5 if preference or online else 8),
                             sharex=True)
    panels = [(axes[0], [("loss", "train loss", "-"), ("val_loss", "validation loss", "o-")],
               "preference loss" if preference else "cross-entropy per trained token"),
              (axes[1], [("lr", "learning rate", "-")], "learning rate"),
              (axes[2], [("grad_norm", "gradient norm (before clipping)", "-")], "gradient norm")]
    if preference:
        panels.append((axes[3], [("rewards/accuracies", "train preference accuracy", "-"),
                                 ("val_preference_accuracy", "held-out preference accuracy", "o-"),
                                 ("val_policy_prefers_chosen", "held-out: policy prefers chosen (mean log-prob)",
                                  "s--"),
                                 ("rewards/margins", "train reward margin", ":")],
                       "accuracy / margin"))
    if online:
        panels[0] = (axes[0], [("loss", "train loss (PPO-clip + KL)", "-")], "RL loss")
        panels.append((axes[3], [("reward", "train reward (sampled)", "-"), ("val_reward", "held-out reward (greedy)",
                                                                               "o-"), ("kl", "KL to the reference", ":")],
                       "reward / KL"))
    for ax, keys, ylabel in panels:
        for key, label, style in keys:
            pts = series(key)
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[0].set_title("tunesmith training")
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
