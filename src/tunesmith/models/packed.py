"""Frozen bf16 linear layers with their weights laid out once for oneDNN, for decoding on a CPU.

A bf16 `F.linear` on a CPU goes to oneDNN, which reorders the weight into its blocked layout on
every call. At a decode step's few rows that reorder is most of the work: measured on this
project's 2-core AVX-512-bf16 CPU, 8 rows through a 576 x 576 layer took 108 us plain and 70 us
with the weight reordered beforehand, and SmolLM2's 49k-token LM head 6.1 ms against 2.2 ms. The
reordered weight gives the same outputs bit for bit (the same kernel; tests/test_packed.py), so the
sampler (training/rollout.py) packs the frozen base's layers for the length of one `sample` call.

The one place that calls oneDNN's private linear ops (`torch.ops.mkldnn._reorder_linear_weight`,
`_linear_pointwise`, what torch.compile's CPU backend uses for the same purpose). A layer is packed
only where it is a plain `nn.Linear` on the CPU with a bf16, contiguous, frozen weight that is an
ordinary tensor (not FSDP's DTensor, not quantised) and no hooks; a call under autograd or
autocast, with another dtype, or after the weight or bias was replaced or changed goes to `F.linear`.
Memory: a packed copy of those weights while the context is open (the model's bf16 linear weights,
~210 MB for SmolLM2-135M), freed on exit.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def supported() -> bool:
    """Whether this torch build and CPU have oneDNN's bf16 linear."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and "forward" not in vars(module)
            and not (module._forward_hooks or module._forward_pre_hooks)
            and type(w) is torch.nn.Parameter and w.device.type == "cpu" and w.dtype == torch.bfloat16
            and not w.requires_grad and w.layout == torch.strided and w.is_contiguous() and w.dim() == 2
            and (module.bias is None or module.bias.dtype == torch.bfloat16))


def _packed_forward(module: torch.nn.Linear, rows: int):
    weight, bias = module.weight, module.bias
    versions = (weight._version, None if bias is None else bias._version)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)

    def forward(x):
        if (torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu") or module.weight is not weight or module.bias is not bias
                or (weight._version, None if bias is None else bias._version) != versions):
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int = 8):
    """Within: each packable linear layer of `model` (see the module docstring) runs on its weight
    reordered once (`rows`: the expected rows per call, oneDNN's hint). Yields how many layers were
    packed; leaves every layer as it found it."""
    patched = []
    try:
        if supported():
            for module in model.modules():
                if _packable(module):
                    module.forward = _packed_forward(module, max(int(rows), 1))
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
