"""Log-likelihoods of a question's continuations in ONE row: its context, then every continuation.

The KV-cache path (prefix_scoring.score_grouped) encodes each context once but then copies the
cache rows once per continuation row and runs a second, short forward. Here a question is one
row and a batch of questions one forward, with no cache copies:

    row    = [context tail ..., segment 1 ..., segment 2 ..., ...]   (segment j = continuation j minus its last token)
    mask   : the context causal; segment j sees the whole context and itself causally, no other segment
    position ids: each segment starts where the context ends, as if it alone followed it

so every position sees exactly the tokens, at the same positions, that the per-choice row
context + continuation[:-1] would have shown it. A continuation's first token is predicted by the
context's last position (shared by all its continuations: one-token choices need no segment at
all) and its k-th token by its segment's (k-1)-th. Contexts are left-padded so that all of them
end in the same column: only that column and the segments reach the output head
(logits_to_keep), which for a small model with a large vocabulary is much of the cost.

The task's shared head (description, BOS, a shots block common to every context) is still encoded
once and reused as a batch-1 KV cache (prefix_scoring._select_rows repeats its rows), so k-shot
prompts with shared shots pay for them once per task.

The custom mask goes into the model as a 4D additive float mask (0 = attend), which transformers
passes unchanged to its eager and sdpa attention; other attention kernels (flash, flex) take no
such mask, and `unsupported` says so (the caller then uses the KV-cache path). A probe compares
one block row with plain forwards, so a model that ignores position ids or the mask is caught
rather than scored wrongly.
"""
from __future__ import annotations

import torch

from tunesmith.eval import prefix_scoring

MASKED_ATTENTION = ("eager", "sdpa")  # transformers hands a 4D mask to these as given
# tokens per forward, per unit of batch_size, when questions are short: fewer, fuller forwards, with the
# logits kept (about a third of the positions, times the vocabulary) still within a few hundred MB
ROW_TOKENS = 256
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # other dtypes: 5e-2 (a wrong mask moves logits by ~1)


def _attention(model) -> str | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "_attn_implementation", None)


@torch.no_grad()
def unsupported(model) -> str | None:
    """Why one-row block scoring cannot run on `model` (prefix_scoring.unsupported(model) being None), or None."""
    attention = _attention(model)
    if attention not in MASKED_ATTENTION:
        return (f"its attention implementation {attention!r} takes no custom 4D mask "
                f"(only {', '.join(MASKED_ATTENTION)} do)")
    # probe: context [3, 4], continuations [5, 6, 7] and [8, 9] in one row vs. each fed whole (right-padded:
    # causal attention keeps padding after a row's end out of its real positions)
    encoded = [([3, 4], [5, 6, 7]), ([3, 4], [8, 9])]
    got = score_blocks(model, encoded, [0, 1], pad=0, batch_size=2, local=True)
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([[3, 4, 5, 6], [3, 4, 8, 0]], device=device)).logits
    for i, (ctx, cont) in enumerate(encoded):
        logprobs = torch.log_softmax(logits[i, len(ctx) - 1:len(ctx) - 1 + len(cont)].double(), -1)
        want = float(logprobs.gather(-1, torch.tensor(cont, device=device)[:, None]).sum())
        tolerance = PROBE_TOLERANCE.get(next(model.parameters()).dtype, 5e-2) * max(1.0, abs(want))
        if abs(got[i] - want) > tolerance:
            return (f"a probe row scored {got[i]:.4f} where the plain forward gives {want:.4f}: the model does not "
                    "honour a custom 4D attention mask with explicit position ids")
    return None


def _pack(lengths: list[int], batch_size: int, row_tokens: int = ROW_TOKENS) -> list[list[list[int]]]:
    """Batches of rows of question indices, questions given longest first. A batch is as wide as its
    first question and holds up to max(batch_size, batch_size * row_tokens // width) rows. A question
    goes into the first row of any batch with room left (first-fit decreasing), else into a row of its
    own in the last batch if it fills at least 3/4 of that width, else it opens a new, narrower batch:
    so the padding of one row per question is mostly filled, and no row is mostly padding."""
    batches: list[list[list[int]]] = []
    free: list[list[int]] = []  # room left in each row, per batch
    widths: list[int] = []
    for q, length in enumerate(lengths):
        fit = next(((b, r) for b, rooms in enumerate(free) for r, room in enumerate(rooms) if room >= length), None)
        if fit is None and batches and 4 * length >= 3 * widths[-1] and \
                len(batches[-1]) < max(batch_size, batch_size * row_tokens // widths[-1]):
            batches[-1].append([])
            free[-1].append(widths[-1])
            fit = (len(batches) - 1, len(batches[-1]) - 1)
        if fit is None:
            batches.append([[]])
            free.append([length])
            widths.append(length)
            fit = (len(batches) - 1, 0)
        b, r = fit
        batches[b][r].append(q)
        free[b][r] -= length
    return batches


def _layout(rows: list[list[tuple[tuple[int, ...], list[tuple[int, ...]]]]], pad: int, start: int, dtype):
    """ids, position ids and 4D mask of one batch of rows, each row a list of (context tail, segments),
    right-padded; and per question its (row, first column, each segment's first column)."""
    width = max(sum(len(t) + sum(len(s) for s in segs) for t, segs in row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)  # which question of the row; -1 padding
    part = torch.zeros((len(rows), width), dtype=torch.long)      # 0 context, j + 1 segment j
    placed = []
    for r, row in enumerate(rows):
        col = 0
        for g, (tail, segs) in enumerate(row):
            first, seg_starts = col, []
            for j, tokens in enumerate((tail, *segs)):
                at = start if j == 0 else start + len(tail)  # every segment continues the context's end
                ids[r, col:col + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                positions[r, col:col + len(tokens)] = torch.arange(at, at + len(tokens))
                group[r, col:col + len(tokens)] = g
                part[r, col:col + len(tokens)] = j
                if j:
                    seg_starts.append(col)
                col += len(tokens)
            placed.append((r, first, seg_starts))
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    real_q = (group >= 0)[:, :, None]
    same = group[:, :, None] == group[:, None, :]
    sees = causal & real_q & same & ((part == 0)[:, None, :] | (part[:, :, None] == part[:, None, :]))
    sees |= torch.eye(width, dtype=torch.bool) & ~real_q  # a padding query sees itself: no all-masked softmax row
    # the cached shared head: seen by every real token
    allowed = torch.cat([real_q.expand(-1, -1, start), sees], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[:, None], placed


class _HeadAt:
    """While active, the output head sees only the hidden states at (rows, cols): a forward pre-hook
    on get_output_embeddings() gathers them, so logits come out as (1, len(rows), vocab). Where the
    head is not that module (or is absent), the hook never fires and `pick` indexes the full logits."""

    def __init__(self, model, rows: torch.Tensor, cols: torch.Tensor):
        self.rows, self.cols, self.handle, self.fired = rows, cols, None, False
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, torch.nn.Module):
            self.handle = head.register_forward_pre_hook(self._gather)

    def _gather(self, module, args):
        hidden, self.fired = args[0], True
        return (hidden[self.rows, self.cols][None], *args[1:])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.fired:
            return logits[0]
        return logits[self.rows, self.cols]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def score_blocks(model, encoded: list[tuple[list[int], list[int]]], indices: list[int], pad: int,
                 batch_size: int, local: bool = False) -> dict[int, float]:
    """{i: summed log p(continuation | context)} for encoded[i], i in indices (none truncated).
    local: this process scores every batch, with no shared head (the probe: no collective calls)."""
    questions: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i in indices:  # context -> segment -> the requests it scores (equal segments are fed once)
        ctx, cont = encoded[i]
        questions.setdefault(tuple(ctx), {}).setdefault(tuple(cont[:-1]), []).append(i)
    if not questions:
        return {}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    shared = prefix_scoring._common_prefix([c[:-1] for c in questions]) if not local and len(questions) > 1 else ()
    state: dict = {}

    def head(rows: int):
        if not shared:
            return None
        if "cache" not in state:  # per process: under several, each encodes the head once
            state["cache"] = prefix_scoring._forward(model, torch.tensor([shared], device=device), 1).past_key_values
        return prefix_scoring._select_rows(state["cache"], torch.zeros(rows, dtype=torch.long))

    def score_batch(rows: list[list[tuple[int, ...]]]) -> list[tuple[int, float]]:
        batch = [c for row in rows for c in row]
        segments = {c: sorted(questions[c], key=len, reverse=True) for c in batch}
        ids, positions, mask, placed = _layout([[(c[len(shared):], segments[c]) for c in row] for row in rows],
                                               pad, len(shared), dtype)
        # every (row, column) whose prediction some continuation needs, each through the head once
        where: dict[tuple[int, int], int] = {}
        picks, slots, out_ids = [], [], []
        for ctx, (r, first, seg_starts) in zip(batch, placed):
            last = first + len(ctx) - len(shared) - 1  # the context's last column
            for seg, col in zip(segments[ctx], seg_starts):
                for i in questions[ctx][seg]:
                    # token k is predicted at the context's last column (k = 0), else at segment column k-1
                    for k, token in enumerate(encoded[i][1]):
                        picks.append((where.setdefault((r, last if k == 0 else col + k - 1), len(where)), token))
                        slots.append(len(out_ids))
                    out_ids.append(i)
        at = torch.tensor(list(where), dtype=torch.long, device=device)
        cache = head(len(rows))
        kwargs = dict(attention_mask=mask.to(device), position_ids=positions.to(device), past_key_values=cache)
        with _HeadAt(model, at[:, 0], at[:, 1]) as gather:
            logits = gather.pick(model(input_ids=ids.to(device), use_cache=cache is not None, **kwargs).logits)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        pick = torch.tensor(picks, dtype=torch.long, device=device)
        values = logprobs[pick[:, 0], pick[:, 1]].double()
        sums = torch.zeros(len(out_ids), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(slots, dtype=torch.long, device=device), values)
        return list(zip(out_ids, sums.tolist()))

    def length(c: tuple[int, ...]) -> int:
        return len(c) - len(shared) + sum(len(s) for s in questions[c])

    order = sorted(questions, key=lambda c: -length(c))
    packed = _pack([length(c) for c in order], batch_size, ROW_TOKENS)
    batches = [[[order[q] for q in row] for row in rows] for rows in packed]
    if local:
        return {i: ll for rows in batches for i, ll in score_batch(rows)}
    return prefix_scoring.scored_in_batches(lambda unit: score_batch(unit[0]), batches, 1)
