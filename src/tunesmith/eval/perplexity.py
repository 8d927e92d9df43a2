"""Perplexity: exp(total NLL / total predicted tokens), token-weighted, of a text file or a data split.

A text file (.txt) is tokenised once, after one document-start token (the tokenizer's BOS, or EOS
where it adds none, as lm-eval's rolling log-likelihood does) so that every text token is
predicted. It is then scored with the sliding window of HF's "perplexity of fixed-length models":
windows of `max_length` tokens start every `stride` tokens and each scores only the tokens no
earlier window scored, so every token is scored exactly once with up to max_length - stride
tokens of context. bits_per_byte = total NLL / ln 2 / the text's UTF-8 bytes.

A data split is read through the data pipeline and each record encoded as in training
(tunesmith.data.tokenize): the scored tokens are exactly the trained ones, the assistant replies
and the EOS after each, so the value is the model's loss on the split.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tunesmith.config import EvalTaskSection
from tunesmith.data.tokenize import IGNORE, encode_example
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.results import TaskResult
from tunesmith.generation import InferenceModel
from tunesmith.models.load import decoder_and_head
from tunesmith.training.distributed.group import map_shared

CONTEXT_CAP = 2048  # default window: the model's context, at most this (longer costs memory, not accuracy)
HEAD_ROWS = 256     # positions projected onto the vocabulary at once: logits never held whole


def default_max_length(model) -> int:
    return min(int(getattr(model.config, "max_position_embeddings", CONTEXT_CAP) or CONTEXT_CAP), CONTEXT_CAP)


def _is_prompt_learning(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return cfg is not None and cfg.is_prompt_learning


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed NLL (float64) of the labels that are not IGNORE; labels[:, t] is the
    token at position t, predicted from positions < t (so labels[:, 0] is never scored)."""
    device = next(model.parameters()).device
    ids, labels = ids.to(device), labels.to(device)
    mask = mask.to(device) if mask is not None else None
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]
    if _is_prompt_learning(model):  # PEFT adds its virtual tokens inside its own forward
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -ids.shape[1]:]
        selected, project = logits[:, :-1][keep], (lambda x: x)
    else:
        decoder, head = decoder_and_head(model)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        selected, project = hidden[:, :-1][keep], head
    flat = targets[keep]
    nll = torch.empty(flat.shape[0], dtype=torch.float64, device=device)
    for s in range(0, flat.shape[0], HEAD_ROWS):
        logp = torch.log_softmax(project(selected[s:s + HEAD_ROWS]).float(), dim=-1)
        nll[s:s + HEAD_ROWS] = -logp.gather(1, flat[s:s + HEAD_ROWS, None])[:, 0].double()
    return torch.zeros(ids.shape[0], dtype=torch.float64, device=device).index_add_(0, rows, nll).cpu()


def _padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-padded batch: causal attention means pads after a row change none of its scores.
    Without padding the mask is None, which lets attention run its causal kernel instead of
    materialising a [rows, heads, length, length] masked score tensor."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE)
    for r, (s, lb) in enumerate(zip(seqs, labels)):
        ids[r, :len(s)], mask[r, :len(s)], lab[r, :len(s)] = torch.tensor(s), 1, torch.tensor(lb)
    return ids, (None if bool(mask.all()) else mask), lab


def _score_rows(im: InferenceModel, seqs: list[list[int]], labels: list[list[int]], batch_size: int) -> list[float]:
    """Summed NLL of each row, in its order; batches hold rows of similar length (little padding).
    Under several processes (evaluation during training) each batch is scored by one of them, the
    same batch one process would score, and the sums gathered."""
    pad = im.tokenizer.pad_token_id if im.tokenizer.pad_token_id is not None else im.tokenizer.eos_token_id
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def score(idx: list[int]) -> list[float]:
        return token_nll(im.model, *_padded([seqs[i] for i in idx], [labels[i] for i in idx], pad)).tolist()

    out = [0.0] * len(seqs)
    for idx, sums in zip(batches, map_shared(score, batches)):
        for i, v in zip(idx, sums):
            out[i] = v
    return out


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens; position 0 is context only."""
    if stride >= max_length:
        raise ConfigError(f"perplexity stride {stride} must be smaller than max_length {max_length}: "
                          "otherwise tokens at window starts would be scored without context or not at all")
    out, prev_end = [], 1
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + max_length, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def _document_start(tokenizer) -> list[int]:
    start = tokenizer("", add_special_tokens=True)["input_ids"]
    return start or [tokenizer.eos_token_id]


def _lengths(task: EvalTaskSection, model) -> tuple[int, int]:
    max_length = task.max_length or default_max_length(model)
    return max_length, task.stride or max_length // 2


def _text_file(im: InferenceModel, task: EvalTaskSection, path: Path) -> tuple[dict, list[dict], dict]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"eval task '{task.name}': {path} is empty")
    ids = _document_start(im.tokenizer) + im.tokenizer(text, add_special_tokens=False)["input_ids"]
    max_length, stride = _lengths(task, im.model)
    spans = windows(len(ids), max_length, stride)
    seqs = [ids[b:e] for b, e, _ in spans]
    labels = [[IGNORE] * (f - b) + ids[f:e] for b, e, f in spans]
    # Every window but the last is max_length long: batched without padding; the last on its own.
    full = len(spans) - 1 if spans[-1][1] - spans[-1][0] < max_length else len(spans)
    sums = (_score_rows(im, seqs[:full], labels[:full], task.batch_size)
            + _score_rows(im, seqs[full:], labels[full:], task.batch_size))
    rows = [{"id": k, "start": b, "end": e, "tokens": e - f, "nll": s / (e - f)}
            for k, ((b, e, f), s) in enumerate(zip(spans, sums))]
    total, tokens = sum(sums), len(ids) - 1
    metrics = {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens,
               "bits_per_byte": total / math.log(2) / len(text.encode("utf-8"))}
    return metrics, rows, {"max_length": max_length, "stride": stride, "windows": len(spans)}


def _data_split(im: InferenceModel, task: EvalTaskSection) -> tuple[dict, list[dict], dict]:
    from tunesmith.eval.tasks import load_task_examples, select

    examples = load_task_examples(task)
    idx = select(len(examples), task)
    max_length = task.max_length or default_max_length(im.model)
    encoded = [encode_example(im.tokenizer, examples[i], max_length) for i in idx]
    keep = [k for k, enc in enumerate(encoded) if enc.trained_tokens > 0]
    if not keep:
        raise DataError(f"eval task '{task.name}': no record of {task.path} has a scored token left within "
                        f"max_length={max_length}; raise the task's max_length")
    sums = _score_rows(im, [encoded[k].input_ids for k in keep], [encoded[k].labels for k in keep],
                       task.batch_size)
    rows = []
    for k, s in zip(keep, sums):
        ex, n = examples[idx[k]], encoded[k].trained_tokens
        prompt = [m["content"] for m in ex.messages if m["role"] != "assistant"]
        reply = [m["content"] for m in ex.messages if m["role"] == "assistant"]
        rows.append({"id": idx[k], "input": prompt[-1] if prompt else ex.text[:200],
                     "reference": reply[-1] if reply else "", "tokens": n, "nll": s / n})
    total, tokens = sum(sums), sum(r["tokens"] for r in rows)
    metrics = {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}
    settings = {"max_length": max_length, "records": len(examples), "limit": task.limit, "sample": task.sample,
                "seed": task.seed, "format": task.format, "columns": task.columns,
                "truncated": sum(encoded[k].truncated for k in keep), "no_scored_tokens": len(idx) - len(keep)}
    return metrics, rows, settings


def evaluate(im: InferenceModel, task: EvalTaskSection) -> TaskResult:
    t0 = time.perf_counter()
    path = Path(task.path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"eval task '{task.name}': text file not found: {path}")
        metrics, rows, settings = _text_file(im, task, path)
    else:
        metrics, rows, settings = _data_split(im, task)
    return TaskResult(task=task.name, kind="perplexity", model=im.label, metrics=metrics, primary="perplexity",
                      n=len(rows), examples=rows, settings={"path": task.path, "batch_size": task.batch_size,
                                                            **settings},
                      seconds=time.perf_counter() - t0)
