"""Which attention kernel a model is loaded with (`model.attn_implementation`), decided once and said
out loud, like the device and precision.

The names are transformers' own `attn_implementation` values; `auto` picks the fastest one that
runs here: flash-attn's kernels on a CUDA GPU training in bf16/fp16 (they take no fp32 inputs)
when the package is installed and the model supports them, else torch's fused
scaled_dot_product_attention, else the model's plain matmul-softmax code. An explicit choice that
cannot run here is a ConfigError before any weights load, never a quiet switch to another kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.errors import ConfigError

FIELD = "model.attn_implementation"
HALF = (torch.bfloat16, torch.float16)
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # as train.precision names them

# name -> what it is (the registry: names.py "attention"; `auto` is added in front of these)
IMPLEMENTATIONS: dict[str, str] = {
    "sdpa": "torch.nn.functional.scaled_dot_product_attention (fused kernels where the device has them)",
    "flash_attention_2": "the flash-attn package's kernels (CUDA GPUs, bf16/fp16)",
    "eager": "the model's own matmul + softmax (the reference implementation)",
}


@dataclass(frozen=True)
class Attention:
    name: str    # what from_pretrained(attn_implementation=...) gets
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _supports(model_class, kind: str) -> bool:
    """Whether the model class declares support for `kind` (sdpa | flash_attn); a class not known
    before loading (None) is assumed to, and transformers checks it when the model loads."""
    return model_class is None or bool(getattr(model_class, f"_supports_{kind}", False))


def _flash_blockers(device: torch.device, dtype: torch.dtype, model_class) -> list[tuple[str, str]]:
    """Why flash_attention_2 cannot run here, as (short reason, reason with its fix); empty when it can.
    In the order to fix them: a GPU, then the package, then the precision."""
    blockers = []
    if device.type != "cuda":
        blockers.append(("no CUDA GPU", f"it needs a CUDA GPU and training runs on {device.type}"))
    elif not flash_attn_installed():
        blockers.append(("flash-attn not installed",
                         "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"))
    if dtype not in HALF:
        name = SHORT.get(dtype, str(dtype))
        blockers.append((f"{name} training; flash-attn needs bf16/fp16",
                         f"it takes bf16/fp16 inputs and training runs in {name} (set train.precision=bf16)"))
    if not _supports(model_class, "flash_attn"):
        blockers.append((f"{model_class.__name__} does not support flash-attn",
                         f"{model_class.__name__} does not support it"))
    return blockers


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype, model_class=None) -> Attention:
    """The implementation to load the model with. `dtype` is the training compute precision
    (Placement.dtype), `model_class` what AutoModelForCausalLM builds (models.load.causal_lm_class)."""
    if requested == "flash_attention_2":
        if blockers := _flash_blockers(device, dtype, model_class):
            raise ConfigError(f"{FIELD}=flash_attention_2 cannot run here: {'; '.join(b for _, b in blockers)}. "
                              f"Set {FIELD}=auto (picks it where it can run) or sdpa")
        return Attention(requested, "as configured")
    if requested == "sdpa" and not _supports(model_class, "sdpa"):
        raise ConfigError(f"{FIELD}=sdpa: {model_class.__name__} does not support it; set {FIELD}=eager or auto")
    if requested in IMPLEMENTATIONS:
        return Attention(requested, "as configured")
    if requested != "auto":
        raise ConfigError(f"{FIELD}={requested!r} is not one of auto, {', '.join(IMPLEMENTATIONS)}")
    blockers = _flash_blockers(device, dtype, model_class)
    if not blockers:
        return Attention("flash_attention_2", f"CUDA, flash-attn installed, {SHORT[dtype]}")
    if not _supports(model_class, "sdpa"):
        return Attention("eager", f"{blockers[0][0]}; {model_class.__name__} does not support sdpa")
    return Attention("sdpa", blockers[0][0])
