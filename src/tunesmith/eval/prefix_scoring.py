"""Log-likelihoods of many continuations after few contexts, each context encoded once.

Multiple-choice scoring asks for log p(choice | context) for every choice of every question: the
per-choice path (multiple_choice._score_rows) feeds context + choice whole, so a question with four
choices encodes its context four times, and a k-shot task re-encodes its shots for every choice.
Here each distinct context is run once and its key/value cache reused:

1. The task's shared head (the longest common token prefix of all contexts: description, BOS, and
   the shots block when the contexts share it) is encoded once, batch 1.
2. A batch of questions (longest first) continues from it with each context's own tail, right-padded
   (causal attention: padding after a row's end cannot change its real positions).
3. Each continuation row takes its question's rows of that cache and is fed [last context token] +
   continuation[:-1], so every one of its positions predicts one continuation token. The cache rows
   of shorter contexts end in padding: an attention mask hides it and position ids start where the
   row's real context ends, so each row sees exactly what the per-choice path would have fed it.

The token ids are encode_pair's, unchanged (the cache holds context ids, continuation ids follow);
pairs the per-choice path would truncate on the left are left to that path, which keeps lm-eval's
cut. Models whose cache cannot be reused this way are reported by `unsupported` and scored by the
per-choice path. This module is the only place that touches transformers' cache objects.
"""
from __future__ import annotations

import copy

import torch

from tunesmith.training.distributed.group import map_shared

ROW_TOKENS = 2048  # lm-eval's default row length: the memory a per-choice batch of batch_size rows may take


def unsupported(model) -> str | None:
    """Why `model`'s KV cache cannot be reused for scoring, or None when it can."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "a prompt-learning adapter (prompt/prefix tuning) puts its own virtual tokens in the cache"
    device = next(model.parameters()).device
    try:  # a one-token probe: which cache does the model build for itself?
        with torch.no_grad():
            cache = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True).past_key_values
    except (TypeError, ValueError, AttributeError) as e:
        return f"its forward does not return a reusable cache ({type(e).__name__}: {e})"
    if not isinstance(cache, DynamicCache):
        return f"it returns a {type(cache).__name__} cache, not a DynamicCache"
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:  # a sliding window drops old keys and a recurrent state absorbs padding: not row-selectable
        return f"its cache has {', '.join(odd)} layers, whose contents depend on padding and length"
    return None


def _select_rows(cache, index: torch.Tensor):
    """A new cache holding `index`'s rows of `cache` (which stays unchanged: forwards append in place)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.batch_select_indices(index.to(layer.keys.device))  # reassigns keys/values, no in-place write
    return out


def _forward(model, ids: torch.Tensor, keep: int, **kwargs):
    """keep = 0: logits of every position; else only the last `keep` reach the output head."""
    try:
        return model(input_ids=ids, logits_to_keep=keep, use_cache=True, **kwargs)
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=ids, use_cache=True, **kwargs)


def _common_prefix(rows: list[tuple[int, ...]]) -> tuple[int, ...]:
    low, high = min(rows), max(rows)  # the set's common prefix is that of its lexicographic extremes
    n = 0
    while n < min(len(low), len(high)) and low[n] == high[n]:
        n += 1
    return low[:n]


@torch.no_grad()
def score_grouped(model, encoded: list[tuple[list[int], list[int]]], indices: list[int], pad: int,
                  batch_size: int) -> dict[int, float]:
    """{i: summed log p(continuation | context)} for encoded[i], i in indices (none truncated)."""
    questions: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        questions.setdefault(tuple(encoded[i][0]), []).append(i)
    if not questions:
        return {}
    heads = sorted(questions, key=lambda c: -len(c))
    device = next(model.parameters()).device
    shared = _common_prefix([c[:-1] for c in heads])
    state: dict = {}

    def shared_cache():
        if shared and "cache" not in state:  # per process: under several, each encodes the head once
            state["cache"] = _forward(model, torch.tensor([shared], device=device), 1).past_key_values
        return state.get("cache")

    def context_cache(batch):
        """The cache of each question's context minus its last token, right-padded, and its width."""
        base = shared_cache()
        if base is not None:
            base = _select_rows(base, torch.zeros(len(batch), dtype=torch.long))
        tails = [c[len(shared):-1] for c in batch]
        width = max(len(t) for t in tails)
        if width == 0:
            return base, len(shared)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for b, tail in enumerate(tails):
            ids[b, :len(tail)] = torch.tensor(tail, dtype=torch.long)
        return _forward(model, ids.to(device), 1, past_key_values=base).past_key_values, len(shared) + width

    def score_batch(batch: list[tuple[int, ...]]) -> list[tuple[int, float]]:
        cache, cached = context_cache(batch)
        rows: dict[tuple[int, tuple[int, ...]], list[int]] = {}  # one row per distinct model input
        for b, ctx in enumerate(batch):
            for i in questions[ctx]:
                rows.setdefault((b, tuple(encoded[i][1][:-1])), []).append(i)
        keys = sorted(rows, key=lambda r: -len(r[1]))
        # continuation rows are short: take more than batch_size per forward, as long as the cache rows
        # they copy stay within what batch_size rows of ROW_TOKENS would hold
        per_forward = max(batch_size, batch_size * ROW_TOKENS // (cached + 1 + len(keys[0][1])))
        out = []
        for s in range(0, len(keys), per_forward):
            chunk = keys[s:s + per_forward]
            width = 1 + len(chunk[0][1])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), cached + width), dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (b, tail) in enumerate(chunk):
                real = len(batch[b]) - 1  # context tokens in the cache; the rest of its row is padding
                ids[r, :1 + len(tail)] = torch.tensor((batch[b][-1], *tail), dtype=torch.long)
                mask[r, :real] = 1
                mask[r, cached:] = 1
                positions[r] = torch.arange(real, real + width)
            rows_cache = None if cache is None else _select_rows(cache, torch.tensor([b for b, _ in chunk]))
            logits = _forward(model, ids.to(device), 0, past_key_values=rows_cache, attention_mask=mask.to(device),
                              position_ids=positions.to(device)).logits
            logprobs = torch.log_softmax(logits[:, -width:].float(), dim=-1)
            for r, key in enumerate(chunk):
                for i in rows[key]:
                    cont = torch.tensor(encoded[i][1], device=device)
                    picked = logprobs[r, :len(cont)].gather(-1, cont[:, None])
                    out.append((i, float(picked.double().sum())))
        return out

    return scored_in_batches(score_batch, heads, batch_size)


def scored_in_batches(score_batch, items: list, batch_size: int) -> dict[int, float]:
    """{request index: log-likelihood} from `score_batch` over `items` in batches. Under several
    processes (evaluation during training) each batch is scored by one of them, the same batch one
    process would score, and the scores gathered."""
    scores: dict[int, float] = {}
    for batch_scores in map_shared(score_batch, [items[s:s + batch_size] for s in range(0, len(items), batch_size)]):
        scores.update(batch_scores)
    return scores
