"""Where and in what precision training runs, decided once and said out loud.

CPUs without native bf16 emulate it 8-13x slower than fp32 (measured on this project's 2-core
machines), so "auto" trains in fp32 there; on GPUs "auto" is bf16 autocast where supported.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tunesmith.errors import ConfigError


def cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    reason: str

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling: its 5-bit exponent flushes small gradients to zero, so the loss
        is multiplied up before backward, gradients divided back before clipping, and steps whose
        gradients overflowed are skipped. bf16 has fp32's exponent range and needs none."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def frozen_dtype(self, method) -> torch.dtype:
        """The dtype to load the base model in for `method`. Adapters training in bf16/fp16 keep the
        frozen base in that precision, on a GPU and on a CPU alike: autocast would cast its fp32
        weights down on every matmul anyway (on a CPU, where weights are read from memory for every
        token, twice the bytes cost time as well as memory). Trained weights stay fp32 (see
        trainable_in_fp32); full fine-tuning trains every weight, so its model loads in fp32."""
        if self.precision != "fp32" and method.saves == "adapter":
            return self.dtype
        return torch.float32


def choose_placement(precision: str = "auto") -> Placement:
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # a rank's own GPU (set from LOCAL_RANK)
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return Placement(dev, precision, f"GPU {torch.cuda.get_device_name()}: {precision} autocast")
        return Placement(dev, precision, f"GPU {torch.cuda.get_device_name()}: {precision} as configured")
    dev = torch.device("cpu")
    native = cpu_has_native_bf16()
    if precision == "auto":
        why = "CPU with native bf16, fp32 kept for exactness" if native else "CPU without native bf16 (it would be emulated, 8-13x slower)"
        return Placement(dev, "fp32", f"{why}: training in fp32")
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; on CPU use fp32 (or bf16 where the CPU supports it)")
    if precision == "bf16" and not native:
        print("warning: this CPU has no native bf16; bf16 will be emulated and much slower than fp32", flush=True)
    return Placement(dev, precision, f"CPU: {precision} as configured")


def trainable_in_fp32(model):
    """Trainable parameters in fp32 whatever the base was loaded in: optimizer updates smaller than a
    bf16/fp16 weight's resolution would otherwise round away. PEFT already upcasts the adapters it
    creates (autocast_adapter_dtype); this holds for every method, whatever a builder does."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device):
    """AdamW (fused where the build supports it), or bitsandbytes' 8-bit / paged AdamW on CUDA."""
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if device.type != "cuda":
        raise ConfigError(f"train.optimizer={name} needs CUDA (bitsandbytes); on CPU use adamw")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot build kernels for `device`, or None.
    Without a compiler the error would only come at the first forward, after loading everything."""
    if device.type == "cuda":
        import importlib.util

        return None if importlib.util.find_spec("triton") else "inductor needs the triton package on GPUs (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()  # what inductor itself runs to find $CXX / g++
    except Exception as exc:  # noqa: BLE001 (any failure means no kernels get built)
        return f"inductor found no C++ compiler for CPU kernels ({type(exc).__name__}; install g++ or set CXX)"
    return None


def compile_decoder_layers(model, device: torch.device) -> int:
    """train.compile: torch.compile each decoder layer's forward; returns how many.

    Layers, not the model: the training loss runs the decoder and then the output head on the trained
    positions only (models.load.decoder_and_head), so model.forward never runs. The compiled function replaces `forward` on each layer, so module
    names and state_dict keys stay as they are (checkpoints, adapters and merges see no wrapper),
    and gradient checkpointing, which wraps the layer's call, stays outside the compiled graph."""
    from tunesmith.training.memory import decoder_layers

    if (problem := compile_problem(device)) is not None:
        raise ConfigError(f"train.compile=true cannot work here: {problem}; or set train.compile=false")
    try:
        layers = decoder_layers(model, needed_by="train.compile")
    except ValueError as exc:
        raise ConfigError(f"{exc}; set train.compile=false") from None
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve allocations of at least `nbytes` with their own mmap, returned to the OS when
    freed. glibc's default raises this threshold as large blocks are freed, so activations end up
    in a heap that keeps the high-water mark of every forward/backward (fragmented, never given
    back): resident memory then sits far above the live tensors. False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, int(nbytes)))
    except (OSError, AttributeError):
        return False


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a run's peak memory (on CUDA; a CPU process's peak RSS cannot be reset, and the
    plan's CPU estimate includes the interpreter and everything loaded before training anyway)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): on CUDA the caching allocator's peak reserved memory on this rank's
    device since reset_peak_memory (the CUDA context and other processes not included); on CPU the
    process's peak resident set (VmHWM, else getrusage's ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device), "torch.cuda.max_memory_reserved (CUDA context not included)"
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS (VmHWM) of the process"
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS (ru_maxrss) of the process"
