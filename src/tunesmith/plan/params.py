"""Exact parameter counts, before any weight is loaded.

The model is built from its config on the meta device (shapes only, no memory) and the method's own
registered builder (methods/) is applied to it, so LoRA target resolution (all-linear from the family
table), ranks, DoRA magnitudes, IA3 vectors, prefix/prompt embeddings and selective name matching
are exactly what `tunesmith train` would build. Tied embeddings are counted once.

QLoRA's adapters are LoRA's; what differs is that the base's linear layers (all but the output head:
bitsandbytes leaves the head in the compute dtype) are stored in 4-bit, counted in `quantized`.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamCounts:
    base: int         # the model's own parameters (tied weights once)
    added: int        # parameters the method adds (adapters, magnitudes, virtual tokens)
    trainable: int    # parameters the optimizer updates (added ones, or the base's for full/selective)
    quantized: int    # base parameters stored quantized (QLoRA: the linear layers but the head)
    embedding: int    # input embedding parameters
    head: int         # output head parameters when not tied to the embedding (else 0)

    @property
    def total(self) -> int:
        return self.base + self.added

    @property
    def trains_base(self) -> bool:
        """The trained parameters are the base's own (full, selective), not added adapters."""
        return self.added == 0


# methods whose base is stored quantized, and the method whose adapters they build
QUANTIZED_BASE = {"qlora": "lora"}


def meta_model(config):
    """The causal LM of `config` on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def count_parameters(config, method_cfg) -> ParamCounts:
    """Counts for the model of `config` under `method_cfg` (a config's MethodSection)."""
    from tunesmith.methods import get_method

    model = meta_model(config)
    base = _unique_numel(model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    head = 0 if out is None or out.weight is model.get_input_embeddings().weight else out.weight.numel()
    quantized = 0
    name = method_cfg.name
    if name in QUANTIZED_BASE:
        quantized = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and m is not out)
        method_cfg = method_cfg.model_copy(update={"name": QUANTIZED_BASE[name]})
    # builders say their targets (training prints that); under the meta device the adapters they add are
    # shapes only too: PEFT otherwise allocates and initialises them in CPU memory (0.8 GB, ~10 s for 70B LoRA)
    with contextlib.redirect_stdout(io.StringIO()), torch.device("meta"):
        built = get_method(method_cfg.name).build(model, method_cfg)
    params = list(built.parameters())
    total = _unique_numel(params)
    trainable = _unique_numel(p for p in params if p.requires_grad)
    return ParamCounts(base=base, added=total - base, trainable=trainable, quantized=quantized,
                       embedding=emb, head=head)


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
