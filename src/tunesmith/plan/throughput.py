"""Time (helper T implements): FLOPs per token for the method (the same formula the benchmarks use:
benchmarks/sft_vs_trl.py imports `flops_per_token` from here), the device's rate (probed or from the
table) x an MFU assumption (tunesmith's own measured runs) -> tokens/s, step time, total time, as a range.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimeEstimate:
    flops_per_token: float
    tokens: int                 # tokens the run will process (all epochs; padding included)
    tokens_source: str          # "counted (N examples, tokenizer X)" | "estimated from a sample of N" | "max_length"
    steps: int
    rate_tflops: float          # the device's dense peak at the run's precision
    mfu: tuple[float, float, float]   # low, expected, high: fraction of peak the run reaches
    mfu_source: str             # "default for cuda bf16" | "median of N local runs" ...
    tokens_per_s: tuple[float, float, float]   # low, expected, high (whole run: every rank together)

    @property
    def seconds(self) -> tuple[float, float, float]:
        """Total seconds: (shortest, expected, longest)."""
        return tuple(self.tokens / t if t > 0 else float("inf") for t in reversed(self.tokens_per_s))

    @property
    def step_seconds(self) -> float:
        return self.seconds[1] / max(self.steps, 1)


def estimate_time(shape, counts, workload, device, cfg) -> TimeEstimate:
    raise NotImplementedError
