"""Bytes per device, component by component (helper M implements `estimate_memory`).

Components (keys of MemoryEstimate.components, in this order; a component that does not apply is 0):
  weights          frozen base weights in their dtype (4-bit NF4 with or without double quant for QLoRA's
                   linear layers; the head, embeddings and norms stay in the compute dtype)
  trainable        trained weights (fp32, training/device.py trainable_in_fp32)
  gradients        of the trained weights (fp32)
  optimizer        AdamW: 2 fp32 moments; 8-bit: 2 bytes; paged: as 8-bit, pageable to CPU
  activations      what the forwards running at once keep for their backward (per layer, with or without
                   checkpointing, train.activation_memory_mb's budget; training/memory.py's per-layer figure)
  logits           the LM head's chunked cross-entropy (training/losses.py CHUNK_ROWS) and its grads
  kv_cache         eval/generation during training (eval.during_training), else 0
  overhead         framework: CUDA context + allocator slack on GPUs; the interpreter, torch and
                   allocator slack on CPU (measured in this process for this machine)
divided by the strategy (ddp: every rank holds all; fsdp: weights, grads and optimizer / world plus one
layer gathered; ZeRO-2: grads and optimizer / world; ZeRO-3: all three / world; offload: to CPU memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits", "kv_cache", "overhead")


@dataclass(frozen=True)
class MemoryEstimate:
    components: dict[str, int]          # bytes on one device (rank 0), COMPONENTS order
    capacity: int                       # bytes the device has
    host: dict[str, int] = field(default_factory=dict)  # bytes put in CPU memory by offload, per component
    notes: tuple[str, ...] = ()         # assumptions said out loud ("activations at the longest sequence: 512")

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def margin(self) -> int:
        """Bytes left (negative: short by that much)."""
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def estimate_memory(shape, counts, workload, device) -> MemoryEstimate:
    raise NotImplementedError
