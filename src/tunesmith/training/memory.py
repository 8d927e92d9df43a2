"""An activation budget: recompute only as many decoder layers as a forward needs to fit.

Gradient checkpointing is all or nothing in transformers: every layer recomputes its forward in
the backward (+1 forward, about +33% compute), whatever the sequence length. But the activations
a layer keeps for its backward grow with the tokens of the forward, and most forwards are short:
only the long ones need to give memory back. With `train.activation_memory_mb` set, each forward
(one example, or one padded micro-batch) checkpoints the fewest layers that bring its activations
under the budget, and the others keep theirs: short sequences pay nothing, a long one pays the
recomputation of just enough layers.

The decision is per forward and thread-local (training/concurrent.py runs examples side by side,
each with its own length), so a checkpointed layer is wrapped once and asks, on every call,
whether the forward running in this thread wants it recomputed. Recomputation gives the same
gradients (tests/test_engine.py), with torch.utils.checkpoint (non-reentrant).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

BYTES = 4  # fp32 activations (the CPU default)
_state = threading.local()


def layer_bytes_per_token(config) -> int:
    """Activations one decoder layer keeps per token for its backward, measured on Llama-style
    layers with saved-tensor hooks (SmolLM2-135M: 40 KB): the normed inputs and outputs of the
    attention and MLP blocks (~6 x hidden), rotated keys and values (2 x kv width) and the MLP's
    gate, up, activation and product (4 x intermediate)."""
    d = config.hidden_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    return BYTES * (6 * d + 2 * kv + 4 * config.intermediate_size)


def layers_to_recompute(tokens: int, n_layers: int, per_token: int, hidden: int, budget_bytes: int) -> int:
    """Fewest layers to checkpoint so that a forward of `tokens` keeps at most `budget_bytes` of
    activations: a kept layer holds tokens*per_token, a checkpointed one only its input
    (tokens*hidden*4), and the backward recomputes one layer at a time (tokens*per_token)."""
    full, ckpt = tokens * per_token, tokens * hidden * BYTES
    if n_layers * full <= budget_bytes:
        return 0
    # (n - k) * full + k * ckpt + full <= budget  ->  k >= ((n + 1) * full - budget) / (full - ckpt)
    k = math.ceil(((n_layers + 1) * full - budget_bytes) / (full - ckpt))
    return min(n_layers, max(0, k))


def decoder_layers(model, needed_by: str = "train.activation_memory_mb") -> torch.nn.ModuleList:
    from tunesmith.models.load import decoder_and_head

    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} has no `layers` list: {needed_by} needs one")
    return layers


class ActivationBudget:
    """Installed once on a model; `with budget.forward(tokens):` around each training forward."""

    def __init__(self, model, budget_mb: float):
        self.layers = decoder_layers(model)
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.per_token, self.hidden = layer_bytes_per_token(config), config.hidden_size
        self.budget = int(budget_mb * 2**20)
        self.recomputed_layers = 0  # layer-forwards recomputed so far (for the report)
        self.layer_forwards = 0
        for i, layer in enumerate(self.layers):
            layer.forward = self._wrapped(i, layer.forward)

    def _wrapped(self, index: int, forward):
        def run(*args, **kwargs):
            if index < getattr(_state, "recompute", 0) and torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)
        return run

    @contextmanager
    def forward(self, tokens: int):
        k = layers_to_recompute(tokens, len(self.layers), self.per_token, self.hidden, self.budget) \
            if torch.is_grad_enabled() else 0
        self.recomputed_layers += k
        self.layer_forwards += len(self.layers) if torch.is_grad_enabled() else 0
        previous, _state.recompute = getattr(_state, "recompute", 0), k
        try:
            yield k
        finally:
            _state.recompute = previous


def budget_of(model) -> ActivationBudget | None:
    return getattr(model, "_tunesmith_activation_budget", None)


def install_budget(model, budget_mb: float) -> ActivationBudget:
    budget = ActivationBudget(model, budget_mb)
    model._tunesmith_activation_budget = budget
    return budget


@contextmanager
def forward_budget(model, tokens: int):
    """Around a training forward of `tokens` tokens: no-op unless a budget is installed."""
    budget = budget_of(model)
    if budget is None:
        yield 0
        return
    with budget.forward(tokens) as k:
        yield k
