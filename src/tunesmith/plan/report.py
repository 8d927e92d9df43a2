"""Plan: the whole estimate for one config on one target, its one-line summary, text and JSON.
`make_plan` assembles it from the parts below it (shapes, params, workload, memory, throughput, advice)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunesmith.plan.advice import Change
from tunesmith.plan.devices import Device
from tunesmith.plan.memory import MemoryEstimate
from tunesmith.plan.params import ParamCounts
from tunesmith.plan.shapes import ModelShape
from tunesmith.plan.throughput import TimeEstimate
from tunesmith.plan.workload import Workload


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
        gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
        lo, mid, hi = self.time.seconds
        verdict = (f"fits ({gb(self.memory.margin)} to spare)" if self.fits
                   else f"does NOT fit (short by {gb(-self.memory.margin)})")
        where = f"{self.gpus} x {self.device.name}" if self.gpus > 1 else self.device.name
        return (f"plan: {self.model} {self.workload.method}, {self.counts.trainable:,} trainable of "
                f"{self.counts.total:,}; {gb(self.memory.total)} of {gb(self.memory.capacity)} per device on "
                f"{where}: {verdict}; ~{_duration(mid)} ({_duration(lo)}-{_duration(hi)}), "
                f"~{self.time.tokens_per_s[1]:,.0f} tokens/s")

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


def make_plan(cfg, device: Device | None = None, gpus: int = 1, data: bool = True, advise: bool = True) -> Plan:
    """The plan of Config `cfg` on `gpus` devices like `device` (None: this machine). data: read the
    training data for its token counts (else max_length is assumed for every example)."""
    raise NotImplementedError
