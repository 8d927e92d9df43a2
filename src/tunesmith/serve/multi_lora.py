"""Batched multi-LoRA: rows of different LoRA adapters (and of the base) in one forward, with one
gathered low-rank product per targeted layer instead of PEFT's per-row routing.

How it works. Each adapter is loaded by PEFT once (so target-module resolution, rank_pattern,
alpha_pattern, rslora scaling and the safetensors key mapping are PEFT's own), its per-layer
lora_A / lora_B weights and scaling are read out (`extract`), and PEFT's layers are taken out
again. For every base nn.Linear some loaded adapter targets, `MultiLora` keeps two stacks over the
loaded adapters, zero-padded to the largest rank any of them uses there:

    A: [n_adapters, r_max, in]      B: [n_adapters, r_max, out]   (B transposed, scaling folded in)

An adapter with a smaller rank has zero rows past its rank, one that does not target the layer is
all zeros there, so both add exactly nothing. A forward hook on the nn.Linear adds the low-rank
term. Inside `with multi.rows(names):` (one per model forward) each row's adapter is known; with U
the adapters present in the batch (m of them) the term for the whole batch is

    h = x @ A[U].reshape(m*r, in).T        # every row against every present adapter: one matmul
    h = h * mask                           # mask[row, j*r:(j+1)*r] = 1 iff row uses adapter U[j]
    y = y + h @ B[U].reshape(m*r, out)     # one matmul back; base rows have an all-zero mask

(a "dense BGMV": two matmuls of width m*r per layer, m-fold redundant low-rank work but no per-row
gather copies and no Python loop over adapters). When many adapters share a batch (m*r large
against the layer's width) the redundant work would dominate, so rows are grouped by adapter
instead (SGMV-style: one x[rows] @ A_u.T @ B_u per present adapter, index_add back); `DENSE_MAX`
picks between them (the micro-timings behind it are beside it). The stacks for a given U are cached per
layer until the next load/unload (when U is every loaded adapter, A[U] is a view, no copy).

The term is computed in the adapter weights' dtype (what PEFT does: its LoRA weights may be fp32
over a bf16 base) and added back in the layer's output dtype. Loading and unloading rebuild the
stacks; the engine runs both between scheduler steps, so no forward sees a half-built stack.
Adapters this cannot express (DoRA and other LoRA variants, lora_bias, modules_to_save, trainable
tokens, non-Linear targets such as embeddings or Conv1D) stay in PEFT and run in batches of their
own; `unmixable_reason` says why, and the caller logs it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.errors import ModelError

# Dense BGMV while m*r_max <= DENSE_MAX[shape] * min(in, out) of the layer, else grouped. Decode steps
# (one token a row) are dominated by per-op overhead, which the grouped loop multiplies by m; prefills
# by flops, which the dense form multiplies by m (micro-timings on a 2-core CPU, 576-wide layers, r=16:
# decode 32 rows, m=4..32: dense 0.3-0.9x grouped; prefill 8 rows x 64 tokens, m=8..32: dense 1.3-1.6x).
DENSE_MAX = {"decode": 2.0, "prefill": 0.125}


@dataclass
class LayerLora:
    """One adapter's weights for one base nn.Linear: A [r, in], B [r, out] (B.T * scaling)."""
    a: torch.Tensor
    b: torch.Tensor


def unmixable_reason(peft_model, name: str, config: dict) -> str | None:
    """Why adapter `name` (loaded in peft_model) cannot be served from the stacks, or None."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for key, why in (("use_dora", "DoRA rescales whole weights"), ("lora_bias", "it trains a bias in lora_B"),
                     ("modules_to_save", "it saves whole modules (modules_to_save)"),
                     ("trainable_token_indices", "it trains token embeddings"),
                     ("alora_invocation_tokens", "it is an activated LoRA")):
        if config.get(key):
            return why
    seen = False
    for mod_name, module in peft_model.named_modules():
        holds = [attr for attr in ("lora_A", "lora_embedding_A", "modules_to_save", "trainable_tokens_delta")
                 if isinstance(getattr(module, attr, None), (nn.ModuleDict, nn.ParameterDict))
                 and name in getattr(module, attr)]
        if not holds:
            continue
        if type(module) is not LoraLinear or holds != ["lora_A"] or type(module.get_base_layer()) is not nn.Linear:
            return f"it adapts {mod_name} ({type(module).__name__}), not a plain nn.Linear"
        if name in getattr(module, "lora_variant", {}):
            return f"it uses a LoRA variant ({type(module.lora_variant[name]).__name__}) at {mod_name}"
        if getattr(module, "fan_in_fan_out", False):
            return f"fan_in_fan_out is set at {mod_name}"
        seen = True
    return None if seen else "PEFT placed none of its LoRA layers"


@torch.no_grad()
def extract(peft_model, name: str) -> dict[nn.Linear, LayerLora]:
    """Adapter `name`'s weights per base nn.Linear (keyed by the module object, which PEFT keeps as
    base_layer and puts back on unload), scaling folded into B. Call after unmixable_reason."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    out = {}
    for module in peft_model.modules():
        if type(module) is LoraLinear and name in module.lora_A:
            a = module.lora_A[name].weight.detach()
            b = module.lora_B[name].weight.detach().t() * module.scaling[name]
            out[module.get_base_layer()] = LayerLora(a.clone(), b.contiguous())
    return out


class _Layer:
    """The stacks of one base nn.Linear and its hook."""

    def __init__(self, linear: nn.Linear, owner: "MultiLora"):
        self.linear, self.owner = linear, owner
        self.a = self.b = None                     # [n, r_max, in], [n, r_max, out]
        self.cache: dict[tuple, tuple] = {}        # present adapters U -> (A[U] flat, B[U] flat)
        self.hook = linear.register_forward_hook(self._hook)

    def rebuild(self, per_adapter: list[LayerLora | None]) -> list[LayerLora | None]:
        """New stacks from each adapter's weights (None: it does not adapt this layer); returns
        those weights as views into the stacks, so each adapter is held once, not twice."""
        present = [p for p in per_adapter if p is not None]
        r = max(p.a.shape[0] for p in present)
        ref = present[0]
        a = ref.a.new_zeros((len(per_adapter), r, ref.a.shape[1]))
        b = ref.b.new_zeros((len(per_adapter), r, ref.b.shape[1]))
        views = []
        for i, p in enumerate(per_adapter):
            if p is not None:
                k = p.a.shape[0]
                a[i, :k], b[i, :k] = p.a, p.b
                p = LayerLora(a[i, :k], b[i, :k])
            views.append(p)
        self.a, self.b, self.cache = a, b, {}
        return views

    def stacks(self, used: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if used not in self.cache:
            if used == tuple(range(self.a.shape[0])):
                pair = (self.a.view(-1, self.a.shape[2]), self.b.view(-1, self.b.shape[2]))
            else:
                idx = torch.tensor(used, device=self.a.device)
                pair = (self.a[idx].reshape(-1, self.a.shape[2]), self.b[idx].reshape(-1, self.b.shape[2]))
            self.cache = {used: pair}  # one entry: a batch's make-up changes rarely
        return self.cache[used]

    def _hook(self, module, args, y):
        rows = self.owner._rows
        if rows is None or not rows.used:
            return None
        x = args[0]
        dtype = self.a.dtype
        r = self.a.shape[1]
        lead = x.shape[:-1]
        if x.numel() != rows.n * rows.tokens * x.shape[-1]:
            # e.g. an MoE expert fed a subset of the tokens: which row a token is no longer follows
            raise ModelError(f"a LoRA-adapted layer ({tuple(x.shape)} input) is not fed every token of the "
                             f"{rows.n} x {rows.tokens} batch, so batched multi-LoRA cannot route its rows; "
                             "merge the adapter with `tunesmith export` and serve the merged model")
        x2 = x.reshape(rows.n, rows.tokens, x.shape[-1])                     # [rows, T, in]
        if rows.dense(r, min(self.a.shape[2], self.b.shape[2]), x2.shape[1]):
            a, b = self.stacks(rows.used)
            h = x2.to(dtype) @ a.t()                                         # [rows, T, m*r]
            if not rows.uniform:
                h = h * rows.mask(r, dtype)[:, None, :]
            # summed in the adapter's dtype, then rounded once: PEFT's order (fp32 LoRA on a bf16 base)
            return (y + (h @ b).reshape(*lead, -1)).to(y.dtype)
        y2 = y.reshape(rows.n, rows.tokens, y.shape[-1]).to(dtype, copy=True)
        for slot, idx in rows.groups():
            y2.index_add_(0, idx, (x2[idx].to(dtype) @ self.a[slot].t()) @ self.b[slot])
        return y2.reshape(y.shape).to(y.dtype)


class _Rows:
    """The rows of one forward: each row's adapter index (-1: the base) and what every layer
    derives from it (present adapters, masks per rank width, row groups), computed once."""

    def __init__(self, slots: list[int], tokens: int, device):
        self.n, self.tokens = len(slots), tokens
        self.used = tuple(sorted({s for s in slots if s >= 0}))
        self.uniform = len(set(slots)) == 1  # one adapter, no base rows: no mask needed
        self.slots = torch.tensor(slots, device=device)
        self._masks: dict = {}
        self._groups = None

    def dense(self, r: int, width: int, tokens: int) -> bool:
        limit = DENSE_MAX["decode" if tokens == 1 else "prefill"]
        return len(self.used) == 1 or len(self.used) * r <= limit * width

    def mask(self, r: int, dtype) -> torch.Tensor:
        key = (r, dtype)
        if key not in self._masks:
            used = torch.tensor(self.used, device=self.slots.device)
            onehot = (self.slots[:, None] == used[None, :]).to(dtype)        # [rows, m]
            self._masks[key] = onehot.repeat_interleave(r, dim=1)           # [rows, m*r]
        return self._masks[key]

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        if self._groups is None:
            self._groups = [(s, (self.slots == s).nonzero().flatten()) for s in self.used]
        return self._groups


class MultiLora:
    """The loaded mixable adapters of one base model, as stacks per targeted nn.Linear. Use only
    from the thread that runs the model (the engine's scheduler)."""

    def __init__(self):
        self.names: list[str] = []                                 # adapter index -> name
        self.weights: dict[str, dict[nn.Linear, LayerLora]] = {}
        self.layers: dict[nn.Linear, _Layer] = {}
        self._rows: _Rows | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def add(self, name: str, weights: dict[nn.Linear, LayerLora]) -> None:
        if name in self.weights:
            raise ValueError(f"adapter {name} is already loaded")
        self.names.append(name)
        self.weights[name] = weights
        self._rebuild()

    def remove(self, name: str) -> None:
        self.names.remove(name)
        del self.weights[name]
        self._rebuild()

    def _rebuild(self) -> None:
        targeted = {lin for w in self.weights.values() for lin in w}
        for lin in [lin for lin in self.layers if lin not in targeted]:
            self.layers.pop(lin).hook.remove()  # no loaded adapter adapts it: the plain layer again
        for lin in targeted:
            if lin not in self.layers:
                self.layers[lin] = _Layer(lin, self)
            views = self.layers[lin].rebuild([self.weights[n].get(lin) for n in self.names])
            for n, v in zip(self.names, views):
                if v is not None:
                    self.weights[n][lin] = v

    @contextmanager
    def rows(self, names: list[str | None], tokens: int, device=None):
        """Within: the model's forward (of `tokens` tokens a row) computes row i with adapter
        names[i] (None: the base)."""
        index = {n: i for i, n in enumerate(self.names)}
        self._rows = _Rows([-1 if n is None else index[n] for n in names], tokens, device)
        try:
            yield
        finally:
            self._rows = None

    def close(self) -> None:
        for layer in self.layers.values():
            layer.hook.remove()
        self.names, self.weights, self.layers = [], {}, {}
