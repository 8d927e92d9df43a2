"""Time: FLOPs per token for the method (the formula the benchmarks use: benchmarks/sft_vs_trl.py
imports `flops_per_token` from here), the device's dense rate (probed or from the table) x an MFU
taken from tunesmith's own measured runs (mfu.py) -> tokens/s, step time and total time, as a range.

Model FLOPs per token (what a position costs, whatever kernels run): every matmul weight of the
decoder costs 2 FLOPs forward, 2 more in the backward for the gradient of its input, and 2 more for
its own gradient where it trains (full: 6 per weight, adapters: 4 per frozen weight and 6 per
adapter weight); the first layer's q/k/v need no input gradient when nothing before them trains
(frozen embeddings); causal attention adds 2 x L x q_width per layer forward (QK^T and AV over L/2
keys on average, L the sequence's length), x3 with its backward; the LM head (vocab x hidden)
runs only on the positions that are trained (data.train_on; tunesmith projects just those);
embeddings are lookups. Gradient checkpointing recomputes the decoder's forward once more; DPO runs
chosen and rejected, and the reference's forward (no gradient: 2 per base weight, the adapter
disabled) every step for adapters, once before training when precomputed (full fine-tuning).
"""
from __future__ import annotations

from dataclasses import dataclass

FULL_KINDS = ("full", "selective")  # methods whose base weights train


CPU_ATTENTION_COST = 3.0  # time of an attention FLOP on a CPU, in linear-layer FLOPs (see estimate_time)


@dataclass(frozen=True)
class TimeEstimate:
    flops_per_token: float      # per real token of the run: padding, recomputation and the reference included
    tokens: int                 # real tokens the run will process, all epochs (what the manifest counts)
    tokens_source: str          # "counted (N examples, tokenizer X)" | "estimated from a sample of N" | "max_length"
    steps: int
    rate_tflops: float          # the device's dense peak at the run's precision
    mfu: tuple[float, float, float]   # low, expected, high: fraction of peak the run reaches
    mfu_source: str             # "default for cuda bf16" | "median of N local runs" ...
    tokens_per_s: tuple[float, float, float]   # low, expected, high (whole run: every rank together)
    padded_tokens: int = 0      # positions the model computes: tokens + padding + virtual tokens
    notes: tuple[str, ...] = ()
    local_correction: float = 1.0   # measured/planned median of local runs applied (1.0: none); manifests
    # keep tokens/s before it (Plan.record), so the next run's correction does not compound on this one

    @property
    def seconds(self) -> tuple[float, float, float]:
        """Total seconds: (shortest, expected, longest); inf when the run's tokens are not known."""
        return tuple(self.tokens / t if t > 0 and self.tokens > 0 else float("inf") for t in reversed(self.tokens_per_s))

    @property
    def step_seconds(self) -> float:
        return self.seconds[1] / max(self.steps, 1)


def linear_weights(shape) -> int:
    """Matmul weights of the decoder layers (q, k, v, o, gate, up, down)."""
    d = shape.hidden
    return shape.layers * (2 * d * shape.q_width + 2 * d * shape.kv_width + 3 * d * shape.intermediate)


def flops_per_token(shape, method: str = "lora", head_share: float = 1.0, mean_len: float = 0.0, *,
                    adapter_params: int = 0, trained_share: float = 1.0, checkpointing: bool = False,
                    frozen_input: bool = False) -> float:
    """Training FLOPs of one position of `shape` (module docstring). method: "full"/"selective"
    train the base (trained_share of its matmul weights: 1 for full), anything else trains
    `adapter_params` added weights; head_share: the share of positions the LM head projects;
    mean_len: the length attention runs over (token-weighted); frozen_input: the first layer's
    input needs no gradient (adapter methods but prompt tuning)."""
    linear = linear_weights(shape)
    head = shape.vocab * shape.hidden * head_share
    attention = 2 * shape.layers * mean_len * shape.q_width  # causal forward, per position
    forward = 2 * (linear + head + adapter_params) + attention
    input_grads = 2 * (linear + head + adapter_params) + 2 * attention
    if frozen_input:
        input_grads -= 2 * shape.hidden * (shape.q_width + 2 * shape.kv_width)
    weight_grads = 2 * adapter_params + (2 * (linear + head) * trained_share if method in FULL_KINDS else 0)
    recompute = 2 * (linear + adapter_params) + attention if checkpointing else 0
    return forward + input_grads + weight_grads + recompute


def reference_flops_per_token(shape, head_share: float, mean_len: float) -> float:
    """One forward without gradient of the base alone (DPO's reference: adapters disabled)."""
    return 2 * (linear_weights(shape) + shape.vocab * shape.hidden * head_share) + \
        2 * shape.layers * mean_len * shape.q_width


def method_flops(shape, counts, workload, head_share: float, mean_len: float, virtual: int = 0) -> float:
    """flops_per_token for a planned run: the method's kind, adapters, checkpointing, frozen input."""
    full = workload.method in FULL_KINDS
    trained_share = 1.0
    if workload.method == "selective":  # a share of the base trains: its weight gradients only
        trained_share = min(1.0, counts.trainable / max(counts.base, 1))
    adapter = 0 if full or workload.method in ("prefix", "prompt") else counts.added
    return flops_per_token(shape, "full" if full else "adapter", head_share, mean_len + virtual,
                           adapter_params=adapter, trained_share=trained_share,
                           checkpointing=workload.gradient_checkpointing,
                           frozen_input=not full and workload.method != "prompt")


def estimate_time(shape, counts, workload, device, cfg, data: bool = True) -> TimeEstimate:
    """The run's time on `workload.world` devices like `device`. data: read the training data for its
    token counts (else data.max_length tokens per example, and the file's row count if it is here)."""
    from tunesmith.plan.mfu import expected_mfu, local_correction
    from tunesmith.plan.work import run_work

    work = run_work(shape, counts, workload, cfg, data)
    notes = list(work.notes)
    rate = device.tflops.get(workload.precision)
    if rate is None:
        rate = device.tflops.get("fp32") or max(device.tflops.values(), default=0.0)
        notes.append(f"{device.name} has no {workload.precision} rate: its fp32 rate is used")
    mfu, mfu_source = expected_mfu(shape, workload, device, cfg, work.forward_tokens)
    fpt = work.flops_per_token
    if device.kind == "cpu" and fpt > 0 and work.attention_flops > 0 and work.attention_len > 0:
        # CPU attention (sdpa's math over [L x L] scores, softmax, masks) runs at about a third of the
        # linear layers' rate (benchmarks/plan_accuracy.py: GSM8K rows at ~216 tokens against the same
        # rows packed to 1024). The default MFU already holds the reference run's attention (its
        # sequences of REFERENCE_ATTENTION tokens): only the share beyond it slows this run down.
        from tunesmith.plan.mfu import REFERENCE_ATTENTION, mfu_kind

        share = work.attention_flops / fpt
        ref_share = share * REFERENCE_ATTENTION[mfu_kind(workload, device)] / work.attention_len
        slow = (1 + (CPU_ATTENTION_COST - 1) * ref_share) / (1 + (CPU_ATTENTION_COST - 1) * share)
        mfu = tuple(m * slow for m in mfu)
        notes.append(f"CPU attention at 1/{CPU_ATTENTION_COST:g} of the matmul rate: {share:.0%} of the FLOPs "
                     f"({ref_share:.0%} in the reference run), x{slow:.2f} on the rate")
    tps = tuple(rate * 1e12 * workload.world * m / fpt if fpt > 0 else 0.0 for m in mfu)
    return TimeEstimate(flops_per_token=fpt, tokens=work.tokens, tokens_source=work.source, steps=work.steps,
                        rate_tflops=rate, mfu=mfu, mfu_source=mfu_source, tokens_per_s=tps,
                        padded_tokens=work.padded_tokens, notes=tuple(notes),
                        local_correction=local_correction(cfg.run.output_dir, device.kind))
