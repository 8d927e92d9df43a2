"""Batches of encoded examples or packed rows: length-grouped to waste little padding, seeded for
reproducibility. `collate` pads a micro-batch into one tensor batch; `collate_examples` keeps each
example (or packed row) its own unpadded sequence (train.micro_batch=example)."""
from __future__ import annotations

import random

import torch

from tunesmith.data.pack import PackedRow, collate_packed
from tunesmith.data.tokenize import IGNORE, Encoded


def epoch_batches(examples: list[Encoded] | list[PackedRow], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """Index lists for one epoch. Shuffled, then sorted by length within windows of 32 batches
    so each batch holds similar lengths (little padding) while the order stays random."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Encoded] | list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is excluded from attention and from the loss."""
    if isinstance(examples[0], PackedRow):
        return collate_packed(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trained_targets(labels: torch.Tensor) -> int:
    """Number of tokens a batch trains on (targets are labels shifted left by one). Packed rows
    count right too: the label at each example boundary is IGNORE (data/pack.py)."""
    return int((labels[:, 1:] != IGNORE).sum())


def collate_examples(items: list[Encoded] | list[PackedRow], pad_id: int, threads: int = 1) -> dict:
    """A micro-batch as separate unpadded sequences (`rows`), which training.losses.sft_loss_sum
    runs `threads` at a time. Nothing is padded, so no attention mask is needed and sdpa keeps its
    causal kernel; a packed row keeps its restarting position_ids. `units` is the micro-batch's
    trained-target count (what the training loop normalises the step's loss by)."""
    rows = []
    for item in items:
        row = {"input_ids": torch.tensor([item.input_ids]), "labels": torch.tensor([item.labels])}
        if isinstance(item, PackedRow):
            row["position_ids"] = torch.tensor([item.position_ids])
        rows.append(row)
    return {"rows": rows, "threads": threads, "units": sum(trained_targets(r["labels"]) for r in rows)}
