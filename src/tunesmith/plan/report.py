"""Plan: the whole estimate for one config on one target, its one-line summary, text and JSON.
`make_plan` assembles it from the parts below it (shapes, params, workload, memory, throughput, advice)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from tunesmith.plan import advice as advice_module
from tunesmith.plan import devices, memory, params, shapes, throughput
from tunesmith.plan.advice import Change
from tunesmith.plan.devices import Device
from tunesmith.plan.memory import MemoryEstimate
from tunesmith.plan.params import ParamCounts
from tunesmith.plan.shapes import ModelShape
from tunesmith.plan.throughput import TimeEstimate
from tunesmith.plan.workload import Workload, resolve_workload

COMPONENT_NOTES = {
    "weights": "frozen base weights", "trainable": "trained weights (fp32)", "gradients": "their gradients",
    "optimizer": "optimizer state", "activations": "activations kept for the backward",
    "logits": "LM head / cross-entropy chunks", "kv_cache": "eval/generation KV cache",
    "overhead": "framework (context, allocator slack)",
}


@dataclass(frozen=True)
class DataStats:
    """What training already measured of its data (given by `tunesmith train`, so the plan reads nothing)."""
    examples: int      # training examples (preference pairs for paired objectives)
    tokens: int        # tokens of one pass over them (both sides of a pair), no padding
    longest: int       # the longest sequence
    trained_longest: int = 0  # the most trained tokens of one sequence (0: unknown, every position assumed)
    source: str = "counted by training"


@dataclass
class Plan:
    model: str
    config_source: str
    shape: ModelShape
    counts: ParamCounts
    workload: Workload
    device: Device
    gpus: int
    memory: MemoryEstimate
    time: TimeEstimate
    advice: list[Change] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def summary(self) -> str:
        """One line: what `tunesmith train` prints before step 1."""
        lo, mid, hi = self.time.seconds
        verdict = (f"fits ({size(self.memory.margin)} to spare)" if self.fits
                   else f"does NOT fit (short by {size(-self.memory.margin)})")
        where = f"{self.gpus} x {self.device.name}" if self.gpus > 1 else self.device.name
        return (f"plan: {self.model} {self.workload.method}, {self.counts.trainable:,} trainable of "
                f"{self.counts.total:,}; {size(self.memory.total)} of {size(self.memory.capacity)} per device on "
                f"{where}: {verdict}; ~{_duration(mid)} ({_duration(lo)}-{_duration(hi)}), "
                f"~{self.time.tokens_per_s[1]:,.0f} tokens/s")

    def record(self) -> dict:
        """What a run's manifest keeps of its plan (manifest "plan"), beside what it measured."""
        lo, mid, hi = self.time.tokens_per_s
        return {"memory_bytes": self.memory.total, "capacity_bytes": self.memory.capacity, "fits": self.fits,
                "components": dict(self.memory.components), "host": dict(self.memory.host),
                "tokens_per_s": mid, "tokens_per_s_range": [lo, hi],
                "tokens_per_s_uncorrected": mid / (self.time.local_correction or 1.0), "seconds": self.time.seconds[1],
                "tokens": self.time.tokens, "tokens_source": self.time.tokens_source, "mfu_source": self.time.mfu_source,
                "device": self.device.name, "device_source": self.device.source,
                "device_tflops": dict(self.device.tflops), "flops_per_token": self.time.flops_per_token,
                "mfu": list(self.time.mfu), "gpus": self.gpus,
                "strategy": self.workload.strategy, "summary": self.summary()}

    def text(self) -> str:
        """The readable breakdown `tunesmith plan` prints."""
        return "\n".join(_text(self))

    def to_json(self) -> dict:
        out = asdict(self)
        out["memory"]["total"], out["memory"]["margin"] = self.memory.total, self.memory.margin
        out["fits"] = self.fits
        out["time"]["seconds"] = list(self.time.seconds)
        out["counts"]["total"] = self.counts.total
        out["summary"] = self.summary()
        return out


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size(b: float) -> str:
    """Bytes for a reader: GB from 1 GiB up, MB below (a tiny model's plan is not all 0.0 GB)."""
    return f"{b / 2**30:.2f} GB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MB"




def _text(p: Plan) -> list[str]:
    c, w, m, t = p.counts, p.workload, p.memory, p.time
    where = f"{p.gpus} x {p.device.name}" if p.gpus > 1 else p.device.name
    out = [f"plan: {p.model} ({p.config_source}) on {where} [device numbers: {p.device.source}]",
           "", "parameters:",
           f"  total      {c.total:>16,}  (base {c.base:,} + added {c.added:,})",
           f"  trainable  {c.trainable:>16,}  ({100 * c.trainable / max(c.total, 1):.2f}%, method {w.method})"]
    if c.quantized:
        out.append(f"  quantized  {c.quantized:>16,}  (4-bit NF4{' with double quant' if w.double_quant else ''})")
    out += ["", f"workload: {w.precision}, {w.micro_batch} sequence(s) x {w.seq_len} tokens per forward"
                f"{f', {w.parallel} forwards at once' if w.parallel > 1 else ''}, grad_accum {w.grad_accum}, "
                f"optimizer {w.optimizer}, checkpointing {'on' if w.gradient_checkpointing else 'off'}; "
                f"strategy {w.strategy} over {w.world} ({w.strategy_reason})",
            "", "memory per device:"]
    out += [f"  {k:<12} {size(v):>11}  {COMPONENT_NOTES.get(k, '')}" for k, v in m.components.items()]
    out += [f"  {'total':<12} {size(m.total):>11}  of {size(m.capacity)}: "
            + (f"{size(m.margin)} to spare" if m.fits else f"short by {size(-m.margin)}")]
    if m.host:
        out.append("  host memory (offload): " + ", ".join(f"{k} {size(v)}" for k, v in m.host.items())
                   + f"; total {size(sum(m.host.values()))}")
    out += [f"  note: {n}" for n in m.notes]
    lo, mid, hi = t.tokens_per_s
    s_lo, s_mid, s_hi = t.seconds
    out += ["", "time:",
            f"  tokens     {t.tokens:,} ({t.tokens_source})",
            f"  steps      {t.steps:,} (~{_duration(t.step_seconds)} each)",
            f"  compute    {t.flops_per_token:.3g} FLOPs per token; device peak {t.rate_tflops:g} TFLOP/s "
            f"({w.precision})",
            f"  MFU        {100 * t.mfu[1]:.0f}% ({100 * t.mfu[0]:.0f}-{100 * t.mfu[2]:.0f}%; {t.mfu_source})",
            f"  tokens/s   {mid:,.0f} ({lo:,.0f}-{hi:,.0f})",
            f"  total      ~{_duration(s_mid)} ({_duration(s_lo)}-{_duration(s_hi)})",
            "", "verdict: " + (f"fits, {size(m.margin)} to spare" if p.fits else
                               f"does NOT fit: short by {size(-m.margin)} per device")]
    if p.advice:
        out += ["", "what would make it fit (cheapest first; add the overrides to the command line):"
                if any(ch.fits for ch in p.advice) else "nothing tried fits alone; the closest changes:"]
        rows = [("change", "memory", "fits", "time", "GPUs", "overrides")] + [
            (ch.description, size(ch.memory_bytes), "yes" if ch.fits else "no", _duration(ch.seconds),
             str(ch.gpus or p.gpus), " ".join(ch.overrides)) for ch in p.advice]
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(5)]
        for r in rows:
            desc = r[0] if len(r[0]) <= widths[0] else r[0][:widths[0] - 3] + "..."
            out.append("  " + "  ".join([desc.ljust(widths[0]), *(r[i].rjust(widths[i]) for i in range(1, 5)), r[5]]))
    elif not p.fits:
        out += ["", "no change tunesmith knows (checkpointing, QLoRA, smaller micro-batches, shorter sequences, "
                    "sharding, offload) brings it under the device's memory"]
    return out


class _Planner:
    """plan_fn for make_plan and the advice's re-plans: the model's config and the parameter counts
    are made once per model and method (a meta-device build each), whatever else a change touches."""

    def __init__(self, device: Device, data: bool, stats: DataStats | None):
        self.device, self.data, self.stats = device, data, stats
        self._configs: dict = {}
        self._counts: dict = {}

    def __call__(self, cfg, gpus: int) -> Plan:
        key = (cfg.model.name, cfg.model.trust_remote_code)
        if key not in self._configs:
            self._configs[key] = shapes.model_config(*key)
        config, source = self._configs[key]
        counts_key = (key, cfg.method.model_dump_json())
        if counts_key not in self._counts:
            self._counts[counts_key] = params.count_parameters(config, cfg.method)
        counts = self._counts[counts_key]
        shape = ModelShape.from_config(config)
        # strategy auto shards full fine-tuning above 70% of a device, as training does
        # (training/distributed/strategy.py full_training_bytes: 16 bytes per trained parameter
        # for weights, gradients and AdamW's moments, plus the frozen ones in fp32)
        from tunesmith.training.distributed.strategy import full_training_bytes_of

        full = (full_training_bytes_of(counts.trainable, 4 * (counts.total - counts.trainable))
                if counts.trains_base else None)
        workload = resolve_workload(cfg, self.device, world=gpus, full_training_bytes=full,
                                    seq_len=self.stats.longest if self.stats else None, model_config=config,
                                    trained_len=self.stats.trained_longest if self.stats else 0,
                                    data_tokens=self.stats.tokens if self.stats else 0)
        mem = memory.estimate_memory(shape, counts, workload, self.device)
        time = throughput.estimate_time(shape, counts, workload, self.device, cfg,
                                        data=self.data and self.stats is None)
        if self.stats is not None:
            time = _with_stats(time, self.stats, cfg, workload)
        return Plan(model=cfg.model.name, config_source=source, shape=shape, counts=counts, workload=workload,
                    device=self.device, gpus=gpus, memory=mem, time=time)


def _with_stats(time: TimeEstimate, stats: DataStats, cfg, w: Workload) -> TimeEstimate:
    """The time estimate with the token count training measured: its steps (training/loop.py
    total_steps) x examples per step x the mean example's tokens (truncated at the planned length)."""
    t = cfg.train
    steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(stats.examples / t.batch_size) / t.grad_accum))
    examples = steps * w.examples_per_step
    if not t.max_steps:  # an epoch's last step may be short
        examples = min(examples, max(1, math.ceil(t.epochs * stats.examples)))
    if cfg.data.packing:  # a step's examples are packed rows of up to max_length tokens each
        rows = max(1, math.ceil(stats.tokens / cfg.data.max_length))
        steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(rows / t.batch_size) / t.grad_accum))
        examples = min(steps * w.examples_per_step, max(1, math.ceil(t.epochs * rows)))
        stats = replace(stats, examples=rows)
    per_example = min(stats.tokens / max(stats.examples, 1), w.seq_len * w.sequences_per_example)
    return replace(time, tokens=int(examples * per_example), steps=steps,
                   tokens_source=f"{stats.source}: {stats.examples:,} examples, {stats.tokens:,} tokens per pass")


def make_plan(cfg, device: Device | None = None, gpus: int = 1, data: bool = True, advise: bool = True,
              stats: DataStats | None = None) -> Plan:
    """The plan of Config `cfg` on `gpus` devices like `device` (None: this machine). data: read the
    training data for its token counts (else max_length is assumed for every example); stats: the
    counts training already has (then nothing is read). advise: when it does not fit, re-plan the
    changes that would make it fit (plan.advice)."""
    planner = _Planner(device or devices.this_machine(), data, stats)
    plan = planner(cfg, gpus)
    if advise and not plan.fits:
        plan.advice = advice_module.advise(planner, cfg, plan)
    return plan
