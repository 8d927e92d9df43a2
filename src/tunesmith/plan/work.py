"""The work of a whole run: its steps (the trainer's own total_steps), the real tokens it processes
(all epochs), the positions it computes (padding, virtual tokens) and its model FLOPs, from the
data's token counts (tokens.py) or, without them, max_length per example."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunWork:
    steps: int
    tokens: int           # real tokens over the run (the manifest's count)
    padded_tokens: int    # positions computed: + padding + prompt tuning's virtual tokens
    flops: float          # model FLOPs of the whole run
    source: str
    notes: tuple[str, ...] = ()
    forward_tokens: float = 0.0  # positions one forward computes, token-weighted (a CPU's matmul rate depends on it)
    flops_per_token: float = 0.0  # per real token (also known when the run's token count is not)
    attention_flops: float = 0.0  # of which attention's score and value matmuls (per real token)
    attention_len: float = 0.0    # the length attention runs over, token-weighted


class _Len:  # what data.batching.epoch_batches reads of an item
    def __init__(self, n: int):
        self.input_ids = range(n)


def padded_widths(widths: list[int], batch_size: int, seed: int) -> list[tuple[int, int]]:
    """(rows, width) of each micro-batch of one epoch, batched as training batches (length-grouped)."""
    from tunesmith.data.batching import epoch_batches

    items = [_Len(w) for w in widths]
    return [(len(b), max(widths[i] for i in b)) for b in epoch_batches(items, batch_size, seed, 0)]


def _rows_in_file(cfg) -> int | None:
    from tunesmith.data.sources import iter_records

    if cfg.data.sources:
        return None
    try:
        return sum(1 for _ in iter_records(cfg.data.train))
    except Exception:  # noqa: BLE001 - not here or unreadable
        return None


def run_work(shape, counts, workload, cfg, data: bool = True) -> RunWork:
    from tunesmith.plan.throughput import method_flops, reference_flops_per_token
    from tunesmith.plan.tokens import count_tokens
    from tunesmith.training.loop import total_steps

    paired = workload.objective == "dpo"  # the dpo recipe's items are pairs for every loss (KTO too)
    seqs = 2 if paired else 1
    notes = []
    found = count_tokens(cfg, paired) if data else None
    max_len = cfg.data.max_length
    if found is not None:
        lengths, widths, items, source = list(found.lengths), list(found.widths), found.items, found.source
        trained = found.trained
    else:
        rows = _rows_in_file(cfg) if data else None
        items = rows or 0
        lengths, widths = [max_len * seqs], [max_len]
        trained = max_len * seqs  # every position trained: the LM head's upper bound
        why = "the data was not read" if not data else "the data or the model's tokenizer is not on this machine"
        source = (f"max_length ({max_len} tokens for each of {rows} rows; the model's tokenizer is not on this "
                  f"machine)" if rows else f"max_length ({max_len} tokens per example; {why})")
    virtual = cfg.method.num_virtual_tokens if workload.method in ("prefix", "prompt") else 0
    extra = virtual if workload.method == "prompt" else 0  # prompt tuning's virtual positions run every layer
    real = sum(lengths)
    n = len(lengths)
    # positions computed for the sample, and the token-weighted length attention spans
    padded = (paired or workload.micro_batch > 1) and not workload.packing
    if padded:
        batches = padded_widths(widths, workload.batch_size, cfg.train.seed)
        computed = sum(r * w * seqs for r, w in batches) + n * seqs * extra
        attn_len = sum(r * w * w for r, w in batches) / max(sum(r * w for r, w in batches), 1)
        forward = sum((r * w * seqs) ** 2 for r, w in batches) / max(sum(r * w * seqs for r, w in batches), 1)
    else:
        computed = real + n * seqs * extra
        attn_len = sum(w * w for w in widths) / max(sum(widths), 1) if not paired else \
            sum(w * w for w in lengths) / max(real, 1)
        forward = attn_len  # one sequence per forward
    if extra or virtual:
        notes.append(f"{virtual} virtual tokens per sequence ({workload.method} tuning)")
    # prefix/prompt tuning go through PEFT's forward: the head projects every position
    head_share = 1.0 if virtual else trained / max(computed, 1)
    fpt = method_flops(shape, counts, workload, head_share, attn_len, virtual)
    per_item_flops = computed / n * fpt
    loop_items = items
    if workload.packing and found is not None:
        from tunesmith.data.pack import best_fit_decreasing

        rows_sample = len(best_fit_decreasing(lengths, max_len))
        loop_items = max(1, round(rows_sample * found.scale))
        forward = real / rows_sample * workload.micro_batch  # packed rows of about this length per forward
        notes.append(f"packing: {loop_items} rows of up to {max_len} tokens")
        # a packed row's attention runs over the whole row (the block mask hides, it does not skip)
        attn_len = real / rows_sample
        fpt = method_flops(shape, counts, workload, head_share, attn_len, virtual)
        per_item_flops = computed / n * fpt
    passes = 3 + (1 if workload.gradient_checkpointing else 0)  # forward, its two backward matmuls, recompute
    attention = passes * 2 * shape.layers * (attn_len + virtual) * shape.q_width * computed / max(real, 1)
    steps = total_steps(loop_items, cfg.train) if loop_items or cfg.train.max_steps else 0
    # micro-batches of the epoch hold loop_items / ceil(loop_items / batch) items on average (the
    # last one is short); a step draws grad_accum of them, epoch after epoch
    per_batch = loop_items / math.ceil(loop_items / workload.batch_size) if loop_items else workload.batch_size
    drawn = steps * workload.grad_accum * per_batch * (items / loop_items if loop_items else 1)
    flops = drawn * per_item_flops
    needs_ref = paired and _needs_reference(workload.loss)
    ref_share = 1.0  # reference forwards per trained item
    if needs_ref:
        ref = reference_flops_per_token(shape, head_share, attn_len) * computed / n
        precomputed = workload.method in ("full", "selective") or cfg.objective.reference == "precomputed"
        ref_share = items / drawn if precomputed and drawn else 1.0
        flops += ref * (items if precomputed else drawn)
        per_item_flops += ref * ref_share
        notes.append("reference log-probs: " + ("one forward over every pair before training" if precomputed
                                                else "a forward of the adapter-disabled base every step"))
    if paired and workload.loss == "kto":
        notes.append("KTO's mismatched KL rows are not counted")
    scale = drawn / n
    return RunWork(steps, round(real * scale), round(computed * scale), flops, source, tuple(notes), forward + extra,
                   per_item_flops * n / real, attention, attn_len + virtual)


def _needs_reference(loss: str) -> bool:
    from tunesmith.training.preference import get_preference_loss

    return get_preference_loss(loss).needs_reference
