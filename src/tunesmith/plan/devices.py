"""Devices a plan can target: this machine (probed), a named GPU from the table, or given numbers.

The table holds each GPU's dense peak (no 2:4 sparsity: datasheets print the sparse figure first for
tensor cores, twice the dense one) in TFLOP/s for bf16 / fp16 tensor-core matmuls with fp32
accumulation (what training uses) and plain fp32 (no TF32: PyTorch leaves it off for matmuls), and its
memory. "80GB" on a datasheet is taken as 80 GiB (an H100 80GB reports 79.6 GiB to torch; a device
in hand always reports its own). Parts without bf16 (V100, T4) have no "bf16" entry.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

GIB = 2 ** 30


@dataclass(frozen=True)
class Device:
    name: str
    kind: str                      # "cuda" | "cpu"
    memory_bytes: int              # what one device holds (a GPU's memory; a CPU machine's RAM)
    tflops: dict[str, float] = field(default_factory=dict)   # precision ("bf16", "fp16", "fp32") -> dense peak
    bf16: bool = True              # native bf16 (Ampere and later; CPUs with avx512_bf16/AMX)
    source: str = "table"          # "table" | "probe" | "given": where the numbers came from


@dataclass(frozen=True)
class GpuSpec:
    name: str
    family: str                    # the token a name must contain ("h100", "4090")
    memory_gb: int
    tflops: dict[str, float]
    variant: tuple[str, ...] = ()  # tokens that pick this row over the family's first ("pcie")
    datasheet: str = ""

    def device(self, memory_bytes: int | None = None) -> Device:
        return Device(self.name, "cuda", memory_bytes or self.memory_gb * GIB, dict(self.tflops),
                      bf16="bf16" in self.tflops, source="table")


def _t(bf16: float | None, fp16: float, fp32: float) -> dict[str, float]:
    return {k: v for k, v in (("bf16", bf16), ("fp16", fp16), ("fp32", fp32)) if v is not None}


# A family's first row is what its bare name means ("h100" -> SXM 80GB, "a100" -> 80GB, "v100" -> 32GB).
GPUS: tuple[GpuSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column): BF16/FP16 1,979 TFLOPS with sparsity, FP32 67
    GpuSpec("H100 SXM 80GB", "h100", 80, _t(989.4, 989.4, 67.0), ("sxm",), "NVIDIA H100 datasheet, SXM"),
    # same datasheet, H100 PCIe column: BF16/FP16 1,513 with sparsity, FP32 51
    GpuSpec("H100 PCIe 80GB", "h100", 80, _t(756.0, 756.0, 51.0), ("pcie",), "NVIDIA H100 datasheet, PCIe"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): the H100 SXM's compute, 141 GB HBM3e
    GpuSpec("H200 141GB", "h200", 141, _t(989.4, 989.4, 67.0), (), "NVIDIA H200 datasheet, SXM"),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 dense (624 sparse), FP32 19.5; 80GB and 40GB SXM
    GpuSpec("A100 SXM 80GB", "a100", 80, _t(312.0, 312.0, 19.5), (), "NVIDIA A100 datasheet"),
    GpuSpec("A100 SXM 40GB", "a100", 40, _t(312.0, 312.0, 19.5), (), "NVIDIA A100 datasheet"),
    # NVIDIA A10 datasheet: BF16/FP16 125 dense (250 sparse), FP32 31.2 (AWS's A10G is the A10's
    # variant; NVIDIA publishes no separate sheet, and the A10's figures are the usual stand-in)
    GpuSpec("A10G 24GB", "a10g", 24, _t(125.0, 125.0, 31.2), (), "NVIDIA A10 datasheet (A10G: AWS variant)"),
    # NVIDIA L4 datasheet: BF16/FP16 242 with sparsity -> 121 dense, FP32 30.3
    GpuSpec("L4 24GB", "l4", 24, _t(121.0, 121.0, 30.3), (), "NVIDIA L4 datasheet"),
    # NVIDIA L40S datasheet: BF16/FP16 733 with sparsity -> 366 dense, FP32 91.6
    GpuSpec("L40S 48GB", "l40s", 48, _t(366.0, 366.0, 91.6), (), "NVIDIA L40S datasheet"),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix table (GeForce RTX 4090): FP16/BF16 tensor
    # with FP32 accumulate 165.2 dense (330.3 sparse), FP32 82.6
    GpuSpec("RTX 4090 24GB", "4090", 24, _t(165.2, 165.2, 82.6), (), "NVIDIA Ada Lovelace whitepaper"),
    # NVIDIA Ampere GA102 whitepaper (GeForce RTX 3090): FP16/BF16 tensor with FP32 accumulate 71 dense, FP32 35.6
    GpuSpec("RTX 3090 24GB", "3090", 24, _t(71.0, 71.0, 35.6), (), "NVIDIA Ampere GA102 whitepaper"),
    # NVIDIA V100 Tensor Core GPU datasheet (SXM2): FP16 tensor 125, FP32 15.7; no bf16
    GpuSpec("V100 SXM2 32GB", "v100", 32, _t(None, 125.0, 15.7), (), "NVIDIA V100 datasheet, SXM2"),
    GpuSpec("V100 SXM2 16GB", "v100", 16, _t(None, 125.0, 15.7), (), "NVIDIA V100 datasheet, SXM2"),
    # NVIDIA T4 datasheet: FP16 (mixed precision) 65, FP32 8.1; no bf16
    GpuSpec("T4 16GB", "t4", 16, _t(None, 65.0, 8.1), (), "NVIDIA T4 datasheet"),
    # AMD Instinct MI300X data sheet: BF16/FP16 1,307.4 dense (2,614.9 with sparsity), FP32 (vector) 163.4
    GpuSpec("MI300X 192GB", "mi300x", 192, _t(1307.4, 1307.4, 163.4), (), "AMD Instinct MI300X data sheet"),
)

_NOISE = ("nvidia", "geforce", "tesla", "amd", "instinct", "rtx", "hbm3e", "hbm3", "hbm2e", "hbm2")


def _tokens(text: str) -> tuple[list[str], int | None]:
    """Lower-case alphanumeric tokens without vendor words, and the memory in GB if written ("40gb")."""
    low = text.lower()
    mem = re.search(r"(\d+)\s*gb\b", low)
    toks = [t for t in re.split(r"[^a-z0-9]+", re.sub(r"(\d+)\s*gb\b", " ", low)) if t and t not in _NOISE]
    # "a100-sxm4-40gb", "sxm2": variant tokens carry a generation digit
    toks += [t.rstrip("0123456789") for t in toks if re.fullmatch(r"(sxm|pcie)\d", t)]
    return toks, int(mem.group(1)) if mem else None


def lookup_gpu(text: str) -> GpuSpec | None:
    """The table's row for a GPU name, loosely: "H100 80GB", "h100", "a100-40gb", "NVIDIA A100-SXM4-40GB",
    "NVIDIA GeForce RTX 4090", "4090". None when no row's family is named."""
    toks, mem = _tokens(text)
    rows = [g for g in GPUS if g.family in toks or any(t == g.family + "x" for t in toks)]
    if not rows:  # "h100sxm", "a10040gb": the family glued to more
        rows = [g for g in GPUS if any(t.startswith(g.family) for t in toks)]
    families = {g.family for g in rows}
    if len(families) > 1:  # "l40s" also starts with "l4": the longest family named wins
        longest = max(families, key=len)
        rows = [g for g in rows if g.family == longest]
    if mem is not None:
        sized = [g for g in rows if g.memory_gb == mem]
        if not sized and rows:
            sizes = sorted({g.memory_gb for g in rows})
            raise ValueError(f"device '{text}': the table has {rows[0].family.upper()} with "
                             f"{', '.join(f'{s}GB' for s in sizes)}, not {mem}GB; give numbers instead "
                             f"(--device {mem}GB,<TFLOPS>)")
        rows = sized
    return next((g for g in rows if set(g.variant) & set(toks)), rows[0] if rows else None)


def table_text() -> str:
    return "; ".join(f"{g.name} ({'/'.join(f'{k} {v:g}' for k, v in g.tflops.items())} TFLOP/s)" for g in GPUS)


def parse_device(text: str) -> Device:
    """--device: a GPU of the table by name, "cpu" (this machine's CPU, probed), or numbers:
    "80GB,989TFLOPS", "memory=80GB,tflops=989", "memory=24GB,bf16=165,fp32=82" (one TFLOP/s figure
    without a precision stands for every precision)."""
    s = text.strip()
    if s.lower() == "cpu":
        return cpu_device()
    if all(_NUMBER.fullmatch(p.strip()) for p in s.lower().split(",")):
        return _given(s)
    gpu = lookup_gpu(s)
    if gpu is None:
        raise ValueError(f"device '{text}' is not in the table; known: {table_text()}; "
                         "or give numbers: --device 80GB,989TFLOPS (memory, dense TFLOP/s)")
    return gpu.device()


_NUMBER = re.compile(r"[a-z0-9]+\s*=\s*[\d.]+\s*(gb|gib|tflops|tflop/s)?|[\d.]+\s*(gb|gib|tflops|tflop/s)")


def lookup_gpu_safe(text: str) -> GpuSpec | None:
    try:
        return lookup_gpu(text)
    except ValueError:
        return None


def _given(text: str) -> Device:
    memory, rates = None, {}
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        key, _, value = part.rpartition("=")
        m = re.fullmatch(r"([\d.]+)\s*(gb|gib|tflops|tflop/s)?", value.strip())
        if not m:
            raise ValueError(f"device '{text}': cannot read '{part}'; write e.g. 80GB,989TFLOPS or memory=80GB,tflops=989")
        number, unit = float(m.group(1)), m.group(2) or ""
        if key in ("memory", "mem") or unit in ("gb", "gib"):
            memory = int(number * GIB)
        elif key in ("bf16", "fp16", "fp32"):
            rates[key] = number
        elif key in ("", "tflops") and (unit.startswith("tflop") or key == "tflops"):
            rates["any"] = number
        else:
            raise ValueError(f"device '{text}': unknown field '{key or part}' (memory, tflops, bf16, fp16, fp32)")
    if memory is None or not rates:
        raise ValueError(f"device '{text}': give both the memory and the dense TFLOP/s, e.g. 80GB,989TFLOPS")
    common = rates.pop("any", None)
    tflops = {p: rates.get(p, common) for p in ("bf16", "fp16", "fp32") if rates.get(p, common) is not None}
    return Device(f"{memory / GIB:g}GB {'/'.join(f'{k} {v:g}' for k, v in tflops.items())} TFLOP/s", "cuda",
                  memory, tflops, bf16="bf16" in tflops, source="given")


# --- this machine ----------------------------------------------------------------------------------

def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo; (platform's name, empty) elsewhere."""
    import platform
    from pathlib import Path

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def cores() -> int:
    """Cores this process may run on (its affinity mask: a container's share, not the host's)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def matmul_gflops(n: int = 2048, rounds: int = 5, repeats: int = 5, dtype=None, m: int | None = None,
                  k: int | None = None, device: str = "cpu") -> float:
    """Best (m x k) @ (k x n) matmul rate in GFLOP/s (square n x n by default) with torch's own thread
    count: the peak model FLOP/s are divided by (benchmarks/_machine.py's machine line uses the
    defaults; a plan probes smaller to stay under a second)."""
    import torch

    m, k = m or n, k or n
    gen = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a plan must not move training's
    a = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
    b = torch.randn(k, n, dtype=dtype, device=device, generator=gen)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    sync()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync()
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return best


# the benchmarks' 2048 x 2048 (the rate the MFU defaults were measured against), best of 3 single
# products instead of 5 x 5: ~0.4 s on an idle 2-core EPYC
PLAN_PROBE = {"n": 2048, "rounds": 3, "repeats": 1}


def best_cpu_rate(probed_gflops: float) -> float:
    """The highest rate this CPU (name, cores, torch threads) has probed, this probe included, kept in
    $TUNESMITH_HOME/plan/cpu-rates.json. A short probe is only ever slowed down, never sped up, by what
    else runs (other processes, a neighbouring VM, this process's own threads still busy): the best
    figure seen is the peak, and MFU defaults are fractions of a peak. Unreadable cache: the probe."""
    import json

    import torch

    from tunesmith.atomic import write_text
    from tunesmith.models.registry import tunesmith_home

    key = f"{cpu_info()[0]} | {cores()} cores | {torch.get_num_threads()} threads"
    path = tunesmith_home() / "plan" / "cpu-rates.json"
    try:
        rates = json.loads(path.read_text()) if path.is_file() else {}
        best = max(float(rates.get(key, 0.0)), probed_gflops)
        if best > float(rates.get(key, 0.0)):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps({**rates, key: best}, indent=1))
        return best
    except (OSError, ValueError, TypeError, AttributeError):
        return probed_gflops


def cpu_device() -> Device:
    import psutil

    from tunesmith.training.device import cpu_has_native_bf16

    rate = best_cpu_rate(matmul_gflops(**PLAN_PROBE)) / 1000
    return Device(f"CPU ({cpu_info()[0]}, {cores()} cores)", "cpu", int(psutil.virtual_memory().total), {"fp32": rate},
                  bf16=cpu_has_native_bf16(), source="probe")


def this_machine() -> Device:
    """The first CUDA GPU (looked up in the table by its name, memory from torch; probed when the
    table does not know it), else this CPU (an fp32 matmul probe, total RAM)."""
    import torch

    if not torch.cuda.is_available():
        return cpu_device()
    name = torch.cuda.get_device_name(0)
    memory = int(torch.cuda.get_device_properties(0).total_memory)
    gpu = lookup_gpu_safe(name)
    if gpu is not None:
        return Device(f"{gpu.name} ({name})", "cuda", memory, dict(gpu.tflops), bf16="bf16" in gpu.tflops,
                      source="table")
    bf16 = bool(torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float16
    low = matmul_gflops(4096, rounds=3, repeats=10, dtype=dtype, device="cuda") / 1000
    rates = {"bf16" if bf16 else "fp16": low, "fp16": low,
             "fp32": matmul_gflops(4096, rounds=3, repeats=5, device="cuda") / 1000}
    return Device(name, "cuda", memory, rates, bf16=bf16, source="probe")
