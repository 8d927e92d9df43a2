"""Prefix cache for the serving engine: requests that share a prompt head (a system prompt, a chat
history, a few-shot block) reuse its keys and values instead of computing them again.

As in vLLM's automatic prefix caching, a prompt is cut into fixed blocks of BLOCK tokens and each
full block is named by a chain hash: sha256 of its parent's hash, the model key (the adapter's
name, or the base: a LoRA changes every layer's keys and values, so blocks are never shared
across adapters) and the block's tokens. A block's hash therefore names the whole prompt up to
its end, and a block's keys and values (computed at absolute positions from 0) are valid for any
prompt with the same head. Blocks live in one LRU bounded by a byte budget; a lookup walks the
chain from the first block and stops at the first one missing.

LRU order: a chain is touched deepest block first and root last, so a shared root (the system
prompt) is the most recently used and a request's own tail is evicted before the head that other
requests share; an evicted parent makes its children unreachable, and they age out in turn.

Exactness: a row that reuses h tokens is prefilled as [its cached h columns][its remaining
tokens], with position ids continuing from h and the attention mask hiding the padding between
the two parts (rows are left-padded within each part), so every real token attends to the same
tokens at the same positions as in a full prefill. At least the last prompt token is always
computed, so its logits exist. That gap of padding columns inside a row is harmless for full
attention but not for sliding-window layers, whose window transformers counts in columns (see
serve/batch.py): models with any layer that is not full attention run without the cache.

Rows that ask for their prompt's logprobs need every prompt position's logits, so they never read
from the cache (their keys and values are still stored for later requests).
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tunesmith.errors import ConfigError

log = logging.getLogger("tunesmith.serve")
BLOCK = 16                 # tokens per block (vLLM's default)
DEFAULT_MB = 256.0         # ~5k tokens of SmolLM2-135M in fp32, ~2k of a 7B model in bf16
Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer (keys, values) [heads, tokens, dim]


@dataclass
class Head:
    """A row's reused prompt head: its first `length` tokens' keys and values."""
    length: int
    layers: Layers


@dataclass
class _Block:
    key: str | None
    layers: Layers
    nbytes: int


def check_budget(mb) -> float:
    """prefix_cache_mb as a float >= 0, or ConfigError naming the option."""
    try:
        value = float(mb)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= 0 or value == float("inf"):  # catches NaN too
        raise ConfigError(f"prefix_cache_mb (--prefix-cache-mb) must be a number of MiB >= 0, 0 turning the "
                          f"prefix cache off (got {mb!r})")
    return value


def for_model(config, mb, stats: dict | None = None) -> "PrefixCache | None":
    """The engine's prefix cache for a model with this config, or None when the budget is 0 or the
    model has layers the cache cannot serve exactly (logged with the reason)."""
    from tunesmith.serve.batch import cache_layer_types

    mb = check_budget(mb)
    if mb == 0:
        return None
    other = sorted(set(cache_layer_types(config)) - {"full_attention"})
    if other:
        log.info("prefix cache off: this %s model has %s layers, whose attention window transformers counts "
                 "in cache columns, and a cached head leaves padding columns inside a row",
                 getattr(config, "model_type", "?"), ", ".join(other))
        return None
    return PrefixCache(int(mb * 2 ** 20), stats=stats)


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK, stats: dict | None = None):
        if budget_bytes <= 0 or block <= 0:
            raise ConfigError(f"a prefix cache needs a positive budget and block size (got {budget_bytes}, {block})")
        self.budget, self.block = int(budget_bytes), int(block)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        # rows that reused at least one block / none; prompt tokens looked up / reused; blocks evicted
        self.stats = stats if stats is not None else {}
        for name in ("prefix_hits", "prefix_misses", "prefix_query_tokens", "prefix_hit_tokens",
                     "prefix_evictions", "prefix_bytes", "prefix_blocks"):
            self.stats.setdefault(name, 0)

    def __len__(self) -> int:
        return len(self._blocks)

    def hashes(self, key: str | None, prompt: list[int]) -> list[bytes]:
        """The chain hash of each full block of the prompt."""
        out, parent = [], b""
        salt = b"\x00" if key is None else b"\x01" + key.encode("utf-8")
        for start in range(0, len(prompt) - self.block + 1, self.block):
            h = hashlib.sha256(parent)
            h.update(len(salt).to_bytes(4, "little") + salt)
            h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in prompt[start:start + self.block]))
            parent = h.digest()
            out.append(parent)
        return out

    def lookup(self, key: str | None, prompt: list[int]) -> Head | None:
        """The longest cached head of this prompt for this model key, at most all but its last token
        (which must be computed for its logits); None when no block is cached."""
        chain = self.hashes(key, prompt[:-1])  # full blocks that leave the last token out
        found = []
        for h in chain:
            block = self._blocks.get(h)
            if block is None:
                break
            found.append(h)
        self.stats["prefix_query_tokens"] += len(prompt)
        if not found:
            self.stats["prefix_misses"] += 1
            return None
        self._touch(found)
        blocks = [self._blocks[h] for h in found]
        layers = [tuple(torch.cat([b.layers[i][j] for b in blocks], dim=-2) for j in (0, 1))
                  for i in range(len(blocks[0].layers))]
        length = len(found) * self.block
        self.stats["prefix_hits"] += 1
        self.stats["prefix_hit_tokens"] += length
        return Head(length, layers)

    def store(self, key: str | None, prompt: list[int], kv) -> None:
        """Keep the full blocks of a prefilled prompt that are not kept yet. kv(start, end): the
        keys and values per layer [heads, end - start, dim] of the prompt's tokens start..end-1
        (asked for once, only for the blocks missing)."""
        chain = self.hashes(key, prompt)
        first = next((i for i, h in enumerate(chain) if h not in self._blocks), len(chain))
        if first < len(chain):
            layers = kv(first * self.block, len(chain) * self.block)
            for i in range(first, len(chain)):
                cols = slice((i - first) * self.block, (i - first + 1) * self.block)
                # clones: a slice would keep the whole gathered tensor alive
                blocks = [(k[:, cols].clone(), v[:, cols].clone()) for k, v in layers]
                nbytes = sum(t.numel() * t.element_size() for pair in blocks for t in pair)
                if nbytes > self.budget:
                    break  # one block is larger than the whole budget: nothing more can be kept
                if chain[i] not in self._blocks:
                    self._blocks[chain[i]] = _Block(key, blocks, nbytes)
                    self.bytes += nbytes
        self._touch(chain)
        self._evict()

    def drop(self, key: str | None) -> None:
        """Forget every block of this model key (an adapter unloaded: a later one of that name may differ)."""
        for h in [h for h, b in self._blocks.items() if b.key == key]:
            self.bytes -= self._blocks.pop(h).nbytes
        self._sync()

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
        self._sync()

    def _touch(self, chain: list[bytes]) -> None:
        for h in reversed(chain):  # the root ends most recently used: shared heads outlive tails
            if h in self._blocks:
                self._blocks.move_to_end(h)

    def _evict(self) -> None:
        while self.bytes > self.budget:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.nbytes
            self.stats["prefix_evictions"] += 1
        self._sync()

    def _sync(self) -> None:
        self.stats["prefix_bytes"], self.stats["prefix_blocks"] = self.bytes, len(self._blocks)


def prefill_inputs(prompts: list[list[int]], heads: list[Head | None], pad_id: int, device):
    """Model inputs for prefilling rows whose heads are cached: (input_ids [rows, S], attention_mask
    [rows, C + S], position_ids [rows, S], cache layers [rows, heads, C, dim]). Row i holds its head
    right-aligned in the C cache columns and its remaining tokens right-aligned in the S new ones;
    positions continue from the head's length, so each token sits where a full prefill puts it."""
    from tunesmith.generation import _left_padded

    lengths = [h.length if h is not None else 0 for h in heads]
    ids, new_mask = _left_padded([p[n:] for p, n in zip(prompts, lengths)], pad_id, device)
    starts = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
    positions = (starts + new_mask.cumsum(-1) - 1).clamp(min=0)  # pads' positions are masked anyway
    width = max(lengths)
    rows = len(prompts)
    old_mask = torch.zeros((rows, width), dtype=new_mask.dtype, device=device)
    model = next(h for h in heads if h is not None)
    layers = []
    for li, (k0, v0) in enumerate(model.layers):
        k = k0.new_zeros((rows, k0.shape[0], width, k0.shape[-1]))
        v = v0.new_zeros((rows, v0.shape[0], width, v0.shape[-1]))
        for r, h in enumerate(heads):
            if h is not None:
                k[r, :, width - h.length:] = h.layers[li][0]
                v[r, :, width - h.length:] = h.layers[li][1]
        layers.append((k, v))
    for r, n in enumerate(lengths):
        if n:
            old_mask[r, width - n:] = 1
    return ids, torch.cat([old_mask, new_mask], dim=-1), positions, layers
