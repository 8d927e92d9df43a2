"""Making a tunesmith row and a TRL row train the same thing, and checking that they did.

A speed ratio means something only if both sides learned the same: the same examples in each
optimizer step, the steps in the same order, the same initial weights and the same loss. The parent
process computes the epoch's steps once with tunesmith's own batching (`steps_of`), then
  * a tunesmith worker calls `follow_steps(order)`: the training loop's `epoch_batches` returns these
    steps, split into whatever micro-batches the run uses, and run_sft/run_dpo's `prepare_model` call
    records a fingerprint of the initial trainable weights (the model it receives is the built one);
  * a TRL worker reads a dataset already in that order with transformers' sequential sampler, and
    starts from the adapter tunesmith's builder makes after the same torch.manual_seed;
  * `check_rows` compares what every row reports: steps, what each step fed the model, the initial
    weights' fingerprint, the step-1 loss and the mean loss over the epoch.
"""
from __future__ import annotations

import hashlib


def steps_of(items, per_step: int, seed: int) -> list[list[int]]:
    """The epoch's steps as item indices: tunesmith's order for `per_step`-item steps (shuffled,
    length-grouped; data.batching.epoch_batches, epoch 0)."""
    from tunesmith.data.batching import epoch_batches

    return epoch_batches(items, per_step, seed, 0)


def fingerprint(model) -> str:
    """sha256 of the trainable weights, in name order: the same start or not."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy())  # the buffer itself: no copy of a full model
    return h.hexdigest()[:16]


def item_tokens(item) -> int:
    """Tokens one pass over an item processes (a preference pair: both sides)."""
    return getattr(item, "n_tokens", None) or len(item.input_ids)


def follow_steps(order: list[list[int]]) -> dict:
    """Make this process's tunesmith training follow `order`; returns what it records: `tokens_fed`
    (each item's tokens, in training order) and `fingerprint` (of the initial trainable weights)."""
    import tunesmith.recipes.sft as sft
    import tunesmith.training.loop as loop

    seen = {"tokens_fed": []}
    per_step = len(order[0])

    def fixed_order(items, batch_size, seed, epoch):
        if epoch > 0 or len(items) != sum(map(len, order)) or per_step % batch_size:
            raise SystemExit(f"benchmark order: epoch {epoch}, {len(items)} items, micro-batch {batch_size}")
        seen["tokens_fed"] += [item_tokens(items[i]) for step in order for i in step]
        return [step[i:i + batch_size] for step in order for i in range(0, len(step), batch_size)]

    prepare = sft.prepare_model

    def recording_prepare(model, cfg, placement):
        seen["fingerprint"] = fingerprint(model)
        return prepare(model, cfg, placement)

    loop.epoch_batches, sft.prepare_model = fixed_order, recording_prepare
    return seen


def untrain_after_eos(ids, trained, eos_id: int, off: int) -> int:
    """Stop training the targets right after an EOS token, in place (`trained`: labels, untrained
    = -100, or a 0/1 completion mask, untrained = 0: `off`); returns how many there were. TRL's
    completion is everything the chat template renders after the prompt, so it also trains the
    newline SmolLM2's template writes after <|im_end|>: one target per sequence that tunesmith does
    not train and the model never has to produce (generation stops at <|im_end|>)."""
    after = trained.new_zeros(trained.shape, dtype=bool)
    after[:, 1:] = ids[:, :-1] == eos_id
    after &= trained != off
    trained[after] = off
    return int(after.sum())


def spread(values: list[float]) -> float:
    """Relative spread: max / min - 1."""
    return max(values) / min(values) - 1


def check_rows(res: dict, expected_tokens: list[int], n_steps: int, step1_tol: float, epoch_tol: float,
               same: tuple[str, ...] = ("tokens", "fingerprint")) -> list[str]:
    """Problems that make the rows' speeds incomparable (empty: they trained the same thing). Each
    row reports steps, losses (per step), mean_loss, tokens_fed (per item, in order) and the `same` keys."""
    problems = []
    for row, r in res.items():
        if r["steps"] != n_steps or len(r["losses"]) != n_steps:
            problems.append(f"{row}: {r['steps']} steps ({len(r['losses'])} losses logged), expected {n_steps}")
        if r["tokens_fed"] != expected_tokens:
            diff = next((i for i, (a, b) in enumerate(zip(r["tokens_fed"], expected_tokens)) if a != b), None)
            problems.append(f"{row}: fed {len(r['tokens_fed'])} items, not the benchmark's {len(expected_tokens)} "
                            f"in order (first difference at item {diff})")
    for key in same:
        if len({r[key] for r in res.values()}) > 1:
            problems.append(f"{key} differ: " + ", ".join(f"{row} {r[key]}" for row, r in res.items()))
    if len(res) > 1 and all(r["losses"] for r in res.values()):
        if spread([r["losses"][0] for r in res.values()]) > step1_tol:
            problems.append(f"step-1 losses differ by more than {step1_tol:.1%} (same weights, same batch: the "
                            "loss is normalised differently)")
        if spread([r["mean_loss"] for r in res.values()]) > epoch_tol:
            problems.append(f"mean losses over the epoch differ by more than {epoch_tol:.0%}")
    return problems
