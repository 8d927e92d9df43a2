"""Packing: many short examples share one sequence, and each still sees only itself.

A packed row concatenates whole examples (never split: an example longer than data.max_length was
already truncated by tokenize). Isolation comes from two things:

* `position_ids` restart at 0 for every example. With `attention_mask=None` and no KV cache,
  transformers (masking_utils.find_packed_sequence_indices) reads each restart as a new sequence
  and builds a block-diagonal causal mask, and RoPE sees each example at its own positions, so a
  packed example computes exactly what it computes alone. models.load.check_packing_isolates
  verifies this on the model being trained instead of trusting it.
* The label of each example's first token is IGNORE. The loss shifts by one (position t predicts
  token t+1), so that label would be predicted from the previous example's last token. Alone it is
  never a target either (nothing precedes it), so packing trains exactly the same targets.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import IGNORE, Encoded


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]  # tokens of each packed example, in row order


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Index lists whose lengths sum to at most `capacity`. Longest first, each into the bin with
    the least free space that still fits it (ties: the older bin), so the result depends only on
    `lengths` and is identical on every run and machine."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (free space, bin index), sorted; full bins leave it
    for i in order:
        need = lengths[i]
        if not 0 < need <= capacity:
            raise ValueError(f"example {i} has {need} tokens; packing needs 1..{capacity}")
        k = bisect_left(open_bins, (need, -1))
        if k == len(open_bins):
            bins.append([])
            free, b = capacity, len(bins) - 1
        else:
            free, b = open_bins.pop(k)
        bins[b].append(i)
        if free > need:
            insort(open_bins, (free - need, b))
    return bins


def pack_row(examples: list[Encoded]) -> PackedRow:
    row = PackedRow([], [], [], [])
    for e in examples:
        row.input_ids += e.input_ids
        row.labels += [IGNORE, *e.labels[1:]]  # never a target from the previous example
        row.position_ids += range(len(e.input_ids))
        row.lengths.append(len(e.input_ids))
    return row


def pack_examples(examples: list[Encoded], max_length: int) -> list[PackedRow]:
    """Rows of at most `max_length` tokens holding every example exactly once. Packed once per
    run (row order is reshuffled every epoch by batching.epoch_batches), so the number of rows,
    hence the number of steps, is known before training starts."""
    bins = best_fit_decreasing([len(e.input_ids) for e in examples], max_length)
    return [pack_row([examples[i] for i in members]) for members in bins]


def collate_packed(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows right-padded to the longest one; no attention_mask, on purpose: transformers only
    derives the per-example mask from position_ids when attention_mask is None. Padding restarts
    its positions too, so it is a segment of its own that no real token attends to."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        positions[i, :n] = torch.tensor(r.position_ids)
        positions[i, n:] -= n
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def describe_packing(examples: list[Encoded], rows: list[PackedRow], max_length: int) -> str:
    tokens = sum(len(e.input_ids) for e in examples)
    return (f"packing: {len(examples)} examples in {len(rows)} rows of <= {max_length} tokens "
            f"({tokens / (len(rows) * max_length):.0%} filled)")
