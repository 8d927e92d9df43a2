"""Rows decoding together on one KV cache (the one place the serving engine touches transformers'
cache): a left-padded prefill, one-token steps, rows joining a running batch and rows leaving it.

Every row is right-aligned: column j of the cache is the same step for all rows, the attention
mask hides each row's padding and position ids count only a row's real tokens, so neither the
padding nor the other rows change what a row computes. Joining rows are prefilled on their own
and their cache is merged by padding the shorter one on the left (zeros, masked out); leaving rows
are selected out, and columns that have become padding for every remaining row are trimmed.
A step that raises leaves the batch as it was before it (so its rows can be retried), and a batch
can be split in two (so the engine can find the row that makes a step fail).

Sliding-window layers (Gemma 2/3, Phi-3, Mistral v0.1, Qwen2 with use_sliding_window) are served
from the same full-length cache: transformers builds their window from the attention mask, not from
the cache (masking_utils' sliding_window_overlay: a query at column q sees columns > q - window), and
a DynamicCache made without a config keeps every layer as a plain full DynamicLayer. Because every
row's tokens fill the trailing columns contiguously (merges pad on the left, trims drop only
columns that are padding in every row), the distance between two columns is the distance between
two of the row's tokens, so the window hides exactly what it would for the row alone. (A row
prefilled from a cached prompt head has padding between the head and the rest: serve/prefix_cache.py
is only used for models whose layers are all full attention, where columns' distances do not matter.) The cost is
memory: a sliding layer holds the whole row, not just the window. A sliding-window cache layer
(DynamicSlidingWindowLayer, which drops old columns) is never used, since dropping columns per
layer would break the column alignment that merging and trimming rely on. Layers whose state is
not a per-token key/value (linear attention, convolution, recurrent, shared-KV "dummy" layers)
cannot be edited this way, and chunked attention (Llama 4) has not been shown to stay exact under
these edits: check_servable refuses both by name.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunesmith.errors import ModelError

Forward = Callable[..., torch.Tensor]  # (names, **model inputs) -> next-token logits [rows, vocab]
SERVABLE_LAYERS = ("full_attention", "sliding_attention")  # cache layers whose columns can be edited


def cache_layer_types(config) -> list[str]:
    """The cache layer type of each decoder layer, as transformers' DynamicCache(config=...) reads
    them: layer_types when the config has them, else sliding_attention when it sets a sliding_window
    (Phi-3, Mistral v0.1), chunked_attention for attention_chunk_size, else full_attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return list(get_layer_types_and_kwargs(text)[0])


def check_servable(config) -> list[str]:
    """The model's cache layer types, or ModelError when a layer's cache cannot be merged and
    trimmed column by column (see the module docstring)."""
    types = cache_layer_types(config)
    bad = sorted(set(types) - set(SERVABLE_LAYERS))
    if bad:
        raise ModelError(f"serving supports models whose layers are all {' or '.join(SERVABLE_LAYERS)}; "
                         f"this {getattr(config, 'model_type', '?')} model has {', '.join(bad)} layers "
                         f"(layer types: {types}), whose cache rows the batching engine cannot merge or "
                         "trim; serve it with a server built for such caches (vLLM, for one)")
    return types


def _cache(layers=None):
    """A DynamicCache of full layers (no config on purpose: see the module docstring), empty or
    holding these (keys, values) per layer."""
    from transformers import DynamicCache

    return DynamicCache() if layers is None else DynamicCache(ddp_cache_data=layers)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim -2 of a cache tensor [rows, heads, T, dim] (or dim -1 of a mask) on the left."""
    extra = width - t.shape[-2 if t.dim() == 4 else -1]
    if extra == 0:
        return t
    return F.pad(t, (0, 0, extra, 0) if t.dim() == 4 else (extra, 0))


class KVBatch:
    def __init__(self, forward: Forward, pad_id: int, device):
        self.forward, self.pad_id, self.device = forward, pad_id, device
        self.cache = None
        self.mask: torch.Tensor | None = None   # [rows, columns], 1 = a real token
        self.names: list[str | None] = []       # each row's adapter (None: the base model)

    def __len__(self) -> int:
        return len(self.names)

    def prefill(self, prompts: list[list[int]], names: list[str | None],
                every_position: bool = False, heads: list | None = None) -> torch.Tensor:
        """Run new rows' prompts (left-padded together) and add them to the batch: their first
        next-token logits [len(prompts), vocab] (float32), or with every_position the logits of
        every column [len(prompts), columns, vocab] (the model's dtype; the last column is the
        next-token one). heads: per row, its prompt's head whose keys and values are already
        known (serve/prefix_cache.Head, or None): only the rest is computed, and such a row holds
        padding columns between the two parts (full-attention models only: see prefix_cache)."""
        from tunesmith.generation import _left_padded

        if heads is not None and any(h is not None for h in heads):
            from tunesmith.serve.prefix_cache import prefill_inputs

            ids, mask, positions, layers = prefill_inputs(prompts, heads, self.pad_id, self.device)
            cache = _cache(layers)
        else:
            ids, mask = _left_padded(prompts, self.pad_id, self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # pads get 0; they are masked anyway
            cache = _cache()
        logits = self.forward(names, input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=cache, use_cache=True, logits_to_keep=0 if every_position else 1)
        self._join(cache, mask, names)
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its last token; next-token logits [rows, vocab]."""
        positions = self.mask.sum(-1, keepdim=True)  # a row's real tokens so far = the new one's position
        before = self.mask
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=-1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        try:
            return self.forward(self.names, input_ids=ids, attention_mask=self.mask, position_ids=positions,
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        except BaseException:
            self._roll_back(before)
            raise

    def _roll_back(self, mask: torch.Tensor) -> None:
        """Undo a step that raised: the layers it reached had appended the new column to their cache."""
        width = mask.shape[1]
        self.cache = _cache([(k[:, :, :width], v[:, :, :width]) for k, v, *_ in self.cache])
        self.mask = mask

    def row_kv(self, row: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values per layer [heads, end - start, dim] of row `row`'s tokens start..end-1
        (counting its real tokens only: padding columns are skipped)."""
        cols = self.mask[row].nonzero()[start:end, 0]
        return [(k[row, :, cols], v[row, :, cols]) for k, v, *_ in self.cache]

    def split(self, rows: list[int]) -> "KVBatch":
        """Move these rows into a new batch (returned); the others stay here, in their order."""
        other = KVBatch(self.forward, self.pad_id, self.device)
        other.cache, other.mask, other.names = self.cache, self.mask, list(self.names)
        other.keep(rows)  # builds its own cache: self's is not touched
        self.keep([i for i in range(len(self)) if i not in set(rows)])
        return other

    def _join(self, cache, mask: torch.Tensor, names: list[str | None]) -> None:
        if self.cache is None:
            self.cache, self.mask, self.names = cache, mask, list(names)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = [(torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                   torch.cat([_left_pad(v0, width), _left_pad(v1, width)]))
                  for (k0, v0, *_), (k1, v1, *_) in zip(self.cache, cache)]
        self.cache = _cache(layers)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.names += names

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); finished and cancelled rows stop costing compute."""
        if len(rows) == len(self) and rows == list(range(len(self))):
            return
        if not rows:
            self.cache, self.mask, self.names = None, None, []
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask[idx]
        first = int(mask.any(0).nonzero()[0])  # leading columns now padding in every row
        self.cache = _cache([(k[idx, :, first:], v[idx, :, first:]) for k, v, *_ in self.cache])
        self.mask = mask[:, first:]
        self.names = [self.names[i] for i in rows]
