"""The machine a benchmark ran on, measured by the benchmark itself: one line every benchmark prints.

A tokens/s figure only means something next to the machine that produced it, and core counts or
CPU names say little about matrix speed (the same "AMD EPYC" label covers very different vCPUs), so
the line carries a measured fp32 matmul rate: ratios of a benchmark's rates to it are what carry
across machines. Used as

    from _machine import machine_line      # benchmarks/ is sys.path[0] when a benchmark runs
    print(machine_line())

    machine: 2 cores (torch threads 2), AMD EPYC, avx2 yes, avx512_bf16 yes, amx_bf16 no;
             fp32 matmul 95.1 GFLOP/s (2048x2048, best of 5); load average 0.12
"""
from __future__ import annotations

import os
from pathlib import Path

# one probe for the benchmarks and `tunesmith plan` (src/tunesmith/plan/devices.py)
from tunesmith.plan.devices import cores, cpu_info, matmul_gflops  # noqa: F401 - re-exported to benchmarks

FLAGS = ("avx2", "avx512_bf16", "amx_bf16")  # fp32 SIMD; native bf16 dot products; bf16 tile units


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat; 0 elsewhere). The
    machine may be shared: a benchmark subtracts its own CPU time from the difference over a
    measurement and flags the row when others used more than a tenth of a core meanwhile."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine_info() -> dict:
    import torch

    name, flags = cpu_info()
    info = {"cores": cores(), "torch_threads": torch.get_num_threads(), "cpu": name,
            **{f: f in flags for f in FLAGS}, "matmul_gflops": round(matmul_gflops(), 1),
            "load_average": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(info: dict) -> str:
    flags = ", ".join(f"{f} {'yes' if info[f] else 'no'}" for f in FLAGS)
    gpu = f"; GPU {info['gpu']}" if "gpu" in info else ""
    return (f"machine: {info['cores']} cores (torch threads {info['torch_threads']}), {info['cpu']}, {flags}; "
            f"fp32 matmul {info['matmul_gflops']:.1f} GFLOP/s (2048x2048, best of 5); "
            f"load average {info['load_average']:.2f}{gpu}")


def machine_line() -> str:
    return describe(machine_info())


if __name__ == "__main__":
    print(machine_line())
