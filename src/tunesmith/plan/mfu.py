"""The MFU a run is expected to reach: a default per (device kind, precision, method kind) taken from
tunesmith's own measured runs, corrected on CPUs for the fixed cost each forward pays per layer
(short sequences of small models lose most to it), and corrected by
the runs already made under the config's run.output_dir (their manifests' planned vs measured
tokens/s) when there are any for the same kind of device.

MFU here is model FLOP/s (throughput.py's formula) over the device's dense peak: on a CPU, the fp32
rate of a square matmul probe (devices.matmul_gflops), the rate benchmarks/_machine.py prints.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

# (device kind, precision, kind) -> (low, expected, high), where the figure comes from.
# CPU figures: the README's idle 2-core AMD EPYC runs of SmolLM2-135M, model FLOPs per token by
# throughput.py's formula on each run's own data (plan/work.py: 543.4 / 760.3 / 939.0 MFLOP) x the
# tokens/s, over the fp32 matmul probe measured in the same benchmark run:
#   adapter: benchmarks/sft_vs_trl.py, LoRA r=16, defaults, 188 tokens/s at 186.5 GFLOP/s -> 0.548;
#   full:    benchmarks/scaling.py, full fine-tuning, 1 process, 124.2 tokens/s at 186.3 GFLOP/s -> 0.507;
#   dpo:     benchmarks/dpo_vs_trl.py, sigmoid DPO with LoRA r=16, 87.0 tokens/s at 144.6 GFLOP/s -> 0.565.
# The range is about the run-to-run spread of the README's figures (~15%).
# CUDA figures: no tunesmith GPU run measured yet: typical single-GPU HF/PEFT training
# (full 35-45% of dense bf16 peak on large models; LoRA lower: frozen weights do 2/3 of the work in
# fewer, smaller kernels); the range is wide on purpose until a measured run corrects it.
README_CPU = {"adapter": (188.0, 186.5, 0.548), "full": (124.2, 186.3, 0.507), "dpo": (87.0, 144.6, 0.565)}
DEFAULTS: dict[tuple[str, str, str], tuple[tuple[float, float, float], str]] = {
    ("cpu", "fp32", "adapter"): ((0.47, 0.55, 0.63), "README: sft_vs_trl.py LoRA r=16 on a 2-core EPYC, 188 tok/s"),
    ("cpu", "fp32", "full"): ((0.43, 0.51, 0.58), "README: scaling.py full fine-tuning on a 2-core EPYC, 124 tok/s"),
    ("cpu", "fp32", "dpo"): ((0.48, 0.57, 0.65), "README: dpo_vs_trl.py sigmoid DPO, LoRA r=16, on a 2-core EPYC, 87 tok/s"),
    ("cuda", "bf16", "adapter"): ((0.15, 0.30, 0.45), "assumed (no tunesmith GPU run measured yet)"),
    ("cuda", "bf16", "full"): ((0.20, 0.38, 0.50), "assumed (no tunesmith GPU run measured yet)"),
    ("cuda", "bf16", "qlora"): ((0.10, 0.20, 0.32), "assumed: LoRA's, less bitsandbytes' 4-bit dequantisation "
                                                    "(no tunesmith GPU run measured yet)"),
}
# Why not a matmul-width probe: single-threaded (how a CPU run's examples run, one thread each) the
# rate of (m x hidden) @ (hidden x intermediate) was flat within this machine's noise from SmolLM2's
# 576 x 1536 to a 1B model's 2048 x 8192 and from 48 to 512 tokens; two-thread probes at small m
# measured thread synchronisation under load, which training does not pay.

# The model the CPU defaults were measured on (SmolLM2-135M: hidden, intermediate) and the positions one
# forward computed in each run (token-weighted: GSM8K examples one at a time; DPO: 4 pairs padded)
REFERENCE_WIDTHS = (576, 1536)
REFERENCE_FORWARD = {"adapter": 240.0, "full": 240.0, "dpo": 2077.0}
# the length attention ran over in those runs, token-weighted: one sequence per forward for SFT; DPO's
# forwards hold 4 pairs = 8 sequences
REFERENCE_ATTENTION = {"adapter": 240.0, "full": 240.0, "dpo": 2077.0 / 8}
# Each forward + backward also pays a fixed cost per layer (operator dispatch, Python, LoRA's module
# calls), worth about this many tokens of SmolLM2-135M's per-layer matmuls on a 2-core EPYC (fitted
# from `tunesmith train` at max_length 96 vs 512 on this machine, alternated with the probe: the
# shorter run reached 0.74x the tokens/s at the same matmul rate); a wider layer's share of it shrinks
# with its matmul weights.
OVERHEAD_TOKENS = 73.0


def mfu_kind(workload, device) -> str:
    kind = "full" if workload.method in ("full", "selective") else "adapter"
    if workload.objective == "dpo" and device.kind == "cpu":
        kind = "dpo"
    if workload.quantized and device.kind == "cuda":
        kind = "qlora"
    return kind


def default_mfu(workload, device) -> tuple[tuple[float, float, float], str]:
    kind = mfu_kind(workload, device)
    precision = workload.precision if device.kind == "cuda" else "fp32"
    if device.kind == "cuda" and precision == "fp16":
        precision = "bf16"  # the same tensor cores: the same share of their peak
    key = (device.kind, precision, kind)
    if key not in DEFAULTS:  # CPU bf16/fp16: emulated on most CPUs, the fp32 figures over the fp32 rate
        key = (device.kind, "fp32" if device.kind == "cpu" else "bf16", kind)
    mfu, source = DEFAULTS[key]
    return mfu, f"default for {key[0]} {key[1]} {key[2]} ({source})"


def overhead_factor(shape, forward_tokens: float, reference_tokens: float) -> float:
    """Throughput at `forward_tokens` per forward relative to the reference run's, from the fixed
    per-layer cost (OVERHEAD_TOKENS, scaled by the layer's matmul weights against SmolLM2's)."""
    from tunesmith.plan.throughput import linear_weights

    rd, rf = REFERENCE_WIDTHS
    ref_layer = 2 * rd * rd + 2 * rd * 192 + 3 * rd * rf  # SmolLM2-135M: q/o 576, k/v 192, mlp 1536
    overhead = OVERHEAD_TOKENS * ref_layer / (linear_weights(shape) / shape.layers)
    return (1 + overhead / reference_tokens) / (1 + overhead / max(forward_tokens, 1.0))


def local_ratios(output_dir: str | Path, device_kind: str) -> list[float]:
    """measured / planned tokens/s of the runs under output_dir on the same kind of device."""
    ratios = []
    for manifest in sorted(Path(output_dir).glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text())
            plan, measured = m.get("plan") or {}, m.get("measured") or {}
            if _kind(plan, m) not in (None, device_kind):
                continue
            expected, got = _tps(plan), _tps(measured)
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # a run without a readable plan says nothing about this one
        if expected and got and expected > 0 and got > 0:
            ratios.append(got / expected)
    return ratios


def local_correction(output_dir: str | Path, device_kind: str) -> float:
    """The measured/planned median expected_mfu applies from local runs (1.0 when there are none)."""
    ratios = local_ratios(output_dir, device_kind)
    return statistics.median(ratios) if ratios else 1.0


def _tps(section: dict) -> float | None:
    # a plan's own estimate before any local-run correction, where recorded: runs corrected by earlier
    # runs would otherwise make the next correction compound on theirs
    value = section.get("tokens_per_s_uncorrected", section.get("tokens_per_s"))
    if value is None and isinstance(section.get("time"), dict):
        value = section["time"].get("tokens_per_s")
    if isinstance(value, (list, tuple)):  # (low, expected, high)
        value = value[1] if len(value) == 3 else value[0]
    return float(value) if isinstance(value, (int, float)) else None


def _kind(plan: dict, manifest: dict) -> str | None:
    """The device kind a run's plan was for: plan["device_kind"], plan["device"]["kind"], or the
    device's name (plan/report.py records devices.Device.name: a CPU's is "CPU (...)")."""
    device = plan.get("device")
    placement = manifest.get("placement")
    for value in (plan.get("device_kind"), device.get("kind") if isinstance(device, dict) else None,
                  placement.get("device") if isinstance(placement, dict) else None):
        if isinstance(value, str):
            return "cuda" if value.startswith("cuda") else "cpu" if value.startswith("cpu") else value
    if isinstance(device, str) and device:
        return "cpu" if device.lower().startswith("cpu") else "cuda"
    return None


def expected_mfu(shape, workload, device, cfg, forward_tokens: float = 0.0) -> tuple[tuple[float, float, float], str]:
    """(low, expected, high) MFU and where it comes from; forward_tokens: positions per forward
    (plan/work.py), which on a CPU scales the default by overhead_factor."""
    (low, mid, high), source = default_mfu(workload, device)
    if device.kind == "cpu" and forward_tokens > 0:
        fixed = overhead_factor(shape, forward_tokens, REFERENCE_FORWARD[mfu_kind(workload, device)])
        low, mid, high = (min(x * fixed, 0.9) for x in (low, mid, high))
        source += (f" x {fixed:.2f} (the fixed per-layer cost of a forward at {forward_tokens:.0f} tokens "
                   "against the reference run's)")
    ratios = local_ratios(cfg.run.output_dir, device.kind)
    if ratios:
        r = statistics.median(ratios)
        spread = (min(ratios) / r, max(ratios) / r) if len(ratios) > 1 else (low / mid, high / mid)
        low, mid, high = mid * r * min(spread[0], 1.0), mid * r, mid * r * max(spread[1], 1.0)
        source = (f"median of {len(ratios)} local run{'s' if len(ratios) > 1 else ''} in {cfg.run.output_dir} "
                  f"(measured/planned {r:.2f}) x {source}")
    return (low, mid, high), source
