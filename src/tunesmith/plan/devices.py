"""Devices a plan can target: this machine (probed), a named GPU from the table, or given numbers.

Helper T fills in: the GPU table (dense bf16/fp16/fp32 TFLOP/s and memory of common GPUs, with the
datasheet each figure comes from), `this_machine()` (CPU: a short matmul probe, memory from psutil;
CUDA: the device's name looked up in the table, memory from torch), and `parse_device()` for the
--device argument ("H100 80GB", "a100-40gb", "cpu", or numbers: "80GB,989TFLOPS").
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Device:
    name: str
    kind: str                      # "cuda" | "cpu"
    memory_bytes: int              # what one device holds (a GPU's memory; a CPU machine's RAM)
    tflops: dict[str, float] = field(default_factory=dict)   # precision ("bf16", "fp16", "fp32") -> dense peak
    bf16: bool = True              # native bf16 (Ampere and later; CPUs with avx512_bf16/AMX)
    source: str = "table"          # "table" | "probe" | "given": where the numbers came from


def this_machine() -> Device:
    raise NotImplementedError


def parse_device(text: str) -> Device:
    raise NotImplementedError
