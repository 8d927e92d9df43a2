"""Multiple choice by log-likelihood, scored the way lm-eval-harness scores it.

For each question the model scores every choice as a continuation of the prompt: the prompt is
lm-eval's own task text (mc_formats), optionally after k solved examples ("shots"), and each
choice is scored as " " + choice (lm-eval's target_delimiter). Tokenisation follows lm-eval's
HFLM exactly: trailing whitespace of the context moves into the continuation, context+continuation
is encoded whole and the continuation is whatever comes after the encoded context's tokens (so a
word boundary is tokenised as the model saw it in training), and over-long inputs lose tokens from
the left. Log-likelihoods therefore agree with lm-eval's to float rounding (tested).

Metrics (fractions), the same definitions as lm-eval's multiple_choice output type:
- acc:        argmax of the summed log-likelihood is the gold choice. The primary metric.
- acc_norm:   argmax of log-likelihood / len(choice), the length in characters of the choice text
              (lm-eval's acc_norm, process_results' completion_len; no delimiter counted).
- acc_bytes:  the same with the choice's UTF-8 byte length (lm-eval's acc_bytes); equal to
              acc_norm for ASCII text.
Ties go to the first choice (numpy argmax, as lm-eval).

Shots are drawn per question with a generator seeded by (task.seed, question id) from
task.shots_path or else from the task file itself, and a shot is never the question being asked
(no record with the same question text). `limit` keeps the first N questions, then `sample`
draws a seeded sample of N from those.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from tunesmith.errors import DataError
from tunesmith.eval import block_scoring, prefix_scoring
from tunesmith.eval.mc_formats import MCItem, load_items
from tunesmith.eval.results import TaskResult

TARGET_DELIMITER = " "     # lm-eval: between prompt and answer
FEWSHOT_DELIMITER = "\n\n"  # lm-eval: after each solved example
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer give a length
log = logging.getLogger("tunesmith.eval")


# --- prompts ----------------------------------------------------------------------------------

def draw_shots(item: MCItem, pool: list[MCItem], k: int, seed: int) -> list[MCItem]:
    """k examples from pool, none asking the item's own question, reproducible per (seed, item)."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}|{item.id}|{item.question}")
    drawn = rng.sample(pool, min(k + 1, len(pool)))
    shots = [s for s in drawn if s.question != item.question][:k]
    if len(shots) < k:  # the pool holds copies of this question: draw again without them
        others = [s for s in pool if s.question != item.question]
        if len(others) < k:
            raise DataError(f"{item.where}: {k} shots asked for but only {len(others)} other questions to draw "
                            "them from; lower task.shots or set task.shots_path")
        shots = rng.sample(others, k)
    return shots


def build_context(item: MCItem, shots: list[MCItem]) -> str:
    """lm-eval's plain-text fewshot_context: description, solved shots, then the question."""
    solved = "".join(s.text + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
    return item.description + solved + item.text


# --- tokenisation, as lm_eval.api.model.TemplateLM / models.huggingface.HFLM ------------------

def prefix_token_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _encode(tok, text: str) -> list[int]:
    # HFLM.tok_encode: the tokenizer's own special-token default, unless the text already
    # starts with the prefix token's text (then no second one is added).
    starts = text.startswith(tok.decode(prefix_token_id(tok)))
    return tok.encode(text, add_special_tokens=False) if starts else tok.encode(text)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval's loglikelihood builds them."""
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:  # " Paris" is one token; "Answer: " + "Paris" would split it differently
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole, ctx = _encode(tok, context + continuation), _encode(tok, context)
    return ctx, whole[len(ctx):]


def model_max_length(model, tok) -> int:
    """lm-eval's resolve_max_length: the model config's context length, else the tokenizer's."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    limit = getattr(tok, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else DEFAULT_MAX_LENGTH


# --- batched scoring --------------------------------------------------------------------------

def _forward_tail(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions. Only those reach the output head, which for a small
    model with a large vocabulary is much of the cost; models without logits_to_keep get all."""
    try:
        logits = model(input_ids=ids, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=ids).logits
    return logits[:, -keep:]


@torch.no_grad()
def score_requests(model, tok, requests: list[tuple[str, str]], batch_size: int = 16,
                   shared_prefix: bool = True) -> list[float]:
    """Summed log-probability of each (context, continuation) pair's continuation tokens.

    shared_prefix: encode each distinct context once and score its continuations from the cached
    keys/values (eval/prefix_scoring.py), or all its continuations in one row behind a block
    attention mask (eval/block_scoring.py, where the model takes one); the same log-likelihoods
    to float rounding. Off, or for a model whose cache cannot be reused (the reason is logged),
    or for a pair truncated to the model's length, each pair is fed whole (`_score_rows`)."""
    encoded = [encode_pair(tok, c, x) for c, x in requests]
    for ctx, cont in encoded:
        if not cont:
            raise DataError(f"a choice encodes to no tokens (context ends {tok.decode(ctx[-8:])!r})")
    max_len = model_max_length(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    whole = list(range(len(encoded)))
    scores: dict[int, float] = {}
    reason = prefix_scoring.unsupported(model) if shared_prefix else None
    if reason:
        log.info("scoring each choice in its own forward: the KV cache of %s cannot be reused (%s)",
                 type(model).__name__, reason)
    elif shared_prefix:
        fits = [i for i in whole if len(encoded[i][0]) + len(encoded[i][1]) <= max_len + 1 and encoded[i][0]]
        block = block_scoring.unsupported(model)
        if block:
            log.info("scoring choices from copied KV-cache rows, not one row per question: %s", block)
        score = prefix_scoring.score_grouped if block else block_scoring.score_blocks
        scores = score(model, encoded, fits, pad, batch_size)
        whole = [i for i in whole if i not in scores]  # truncated on the left: lm-eval's cut, below
    scores.update(_score_rows(model, encoded, whole, max_len, pad, batch_size))
    return [scores[i] for i in range(len(encoded))]


def _score_rows(model, encoded, indices: list[int], max_len: int, pad: int, batch_size: int) -> dict[int, float]:
    """The per-choice path: each pair fed whole, as lm-eval does.

    Requests whose model input is the same token row (one-token choices after one context, the
    common case in ARC) share one row, as lm-eval's logits cache does. Rows are sorted longest
    first (lm-eval's order, so padding stays small) and right-padded: with causal attention,
    padding after a row's end cannot change its real positions, so no attention mask is needed
    (lm-eval runs the same way)."""
    shared: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        ctx, cont = encoded[i]
        shared.setdefault(tuple((ctx + cont)[-(max_len + 1):][:-1]), []).append(i)  # the last token is only predicted
    device = next(model.parameters()).device
    rows = sorted(shared, key=lambda r: -len(r))

    def score_batch(batch: list[tuple[int, ...]]) -> list[tuple[int, float]]:
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for b, row in enumerate(batch):
            ids[b, :len(row)] = torch.tensor(row)
        keep = max(width - len(row) + len(encoded[i][1]) for row in batch for i in shared[row])
        logprobs = torch.log_softmax(_forward_tail(model, ids.to(device), keep).float(), dim=-1)
        out = []
        for b, row in enumerate(batch):
            end = keep - (width - len(row))  # one past the row's last real position in the tail
            for i in shared[row]:
                cont = encoded[i][1]
                picked = logprobs[b, end - len(cont):end].gather(-1, torch.tensor(cont, device=device)[:, None])
                out.append((i, float(picked.double().sum())))
        return out

    return prefix_scoring.scored_in_batches(score_batch, rows, batch_size)


# --- the evaluator ----------------------------------------------------------------------------

def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima


def sample_positions(total: int, limit: int | None, sample: int | None, seed: int) -> list[int]:
    """Positions evaluated: the first `limit`, then a seeded sample of `sample` of those, in file order."""
    positions = list(range(min(total, limit) if limit else total))
    if sample and sample < len(positions):
        positions = sorted(random.Random(seed).sample(positions, sample))
    return positions


def select(items: list[MCItem], limit: int | None, sample: int | None, seed: int) -> list[MCItem]:
    return [items[i] for i in sample_positions(len(items), limit, sample, seed)]


def _row(item: MCItem, lls: list[float]) -> dict:
    pred = _argmax(lls)
    pred_norm = _argmax([ll / max(len(c), 1) for ll, c in zip(lls, item.choices)])
    pred_bytes = _argmax([ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, item.choices)])
    return {"id": item.id, "input": item.question, "reference": item.labels[item.gold],
            "prediction": item.labels[pred], "score": float(pred == item.gold),
            "prediction_norm": item.labels[pred_norm], "score_norm": float(pred_norm == item.gold),
            "score_bytes": float(pred_bytes == item.gold), "loglikelihoods": lls, "choices": item.choices}


def scoring_mode(model, shared_prefix: bool) -> str:
    """How score_requests scores on this model, for the results file."""
    if not shared_prefix:
        return "per choice (shared_prefix off)"
    reason = prefix_scoring.unsupported(model)
    if reason:
        return f"per choice: {reason}"
    block = block_scoring.unsupported(model)
    return f"shared-prefix KV cache (not one row per question: {block})" if block else \
        "shared prefix, one row per question (block attention mask)"


def score_items(model, tok, items: list[MCItem], contexts: list[str], batch_size: int = 16,
                shared_prefix: bool = True) -> list[dict]:
    requests = [(ctx, TARGET_DELIMITER + c) for item, ctx in zip(items, contexts) for c in item.choices]
    lls = score_requests(model, tok, requests, batch_size, shared_prefix)
    rows, at = [], 0
    for item in items:
        rows.append(_row(item, lls[at:at + len(item.choices)]))
        at += len(item.choices)
    return rows


def evaluate(im, task) -> TaskResult:
    """One multiple_choice task section (config.EvalTaskSection) on an InferenceModel."""
    started = time.perf_counter()
    items, fmt = load_items(task.path, task.format, task.columns)
    pool = items
    if task.shots and task.shots_path:
        pool, _ = load_items(task.shots_path, fmt, task.columns)
    chosen = select(items, task.limit, task.sample, task.seed)
    contexts = [build_context(it, draw_shots(it, pool, task.shots, task.seed)) for it in chosen]
    was_training = im.model.training
    im.model.eval()  # also called during training: put the mode back afterwards
    try:
        rows = score_items(im.model, im.tokenizer, chosen, contexts, task.batch_size, task.shared_prefix)
    finally:
        im.model.train(was_training)
    n = len(rows)
    metrics = {name: sum(r[key] for r in rows) / n
               for name, key in (("acc", "score"), ("acc_norm", "score_norm"), ("acc_bytes", "score_bytes"))}
    settings = {"path": str(Path(task.path)), "format": fmt, "shots": task.shots, "shots_path": task.shots_path,
                "seed": task.seed, "limit": task.limit, "sample": task.sample, "batch_size": task.batch_size,
                "scoring": scoring_mode(im.model, task.shared_prefix),
                "acc_norm": "log-likelihood / characters of the choice (lm-eval acc_norm)",
                "example_prompt": contexts[0] + TARGET_DELIMITER + chosen[0].choices[chosen[0].gold]}
    return TaskResult(task=task.name, kind="multiple_choice", model=im.label, metrics=metrics, primary="acc",
                      n=n, examples=rows, settings=settings, seconds=round(time.perf_counter() - started, 3))

