"""One pass over the examples that computes, per row, everything `data inspect` and `data prepare`
need: token length and loss-mask statistics, the exact-duplicate key, the MinHash signature and
the one-word-edit keys of short rows, the
PII kinds found and the first overlap with an eval set.

The pass runs in worker processes, one per core: tokenising and hashing are CPU-bound Python.
Workers are forked, so the tokenizer, the examples and the eval index are inherited rather than
pickled; only (start, end) ranges go out and small per-row results come back.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data import dedup, pii
from tunesmith.data.contamination import EvalIndex
from tunesmith.data.records import Example
from tunesmith.data.tokenize import IGNORE, Encoded, encode_example, encode_preference
from tunesmith.errors import DataError

CHUNK = 256  # rows per task: large enough to amortise MinHash.bulk, small enough for even progress
UNTRUNCATED = 1 << 62


@dataclass
class AuditSettings:
    max_length: int
    train_on: str = "all_assistant"
    near: bool = True  # compute MinHash signatures
    num_perm: int = 128
    shingle_size: int = 3
    scan_pii: bool = True


@dataclass
class TokenStats:
    length: int        # tokens before truncation (the longer side of a preference pair)
    kept: int          # tokens after truncation (both sides of a preference pair)
    trained: int       # loss-bearing tokens after truncation
    empty_mask: bool   # nothing left to train
    missing_eos: bool  # a trained span lost its EOS (cut by truncation)
    chosen: int = 0    # preference rows: prompt + chosen tokens
    rejected: int = 0  # preference rows: prompt + rejected tokens


@dataclass
class Audit:
    """Per-row results, in row order."""
    keys: list[bytes] = field(default_factory=list)
    signatures: np.ndarray | None = None
    has_words: np.ndarray | None = None
    edit_keys: list[np.ndarray | None] = field(default_factory=list)  # one-word neighbourhoods of short rows
    pii: list[tuple[str, ...]] = field(default_factory=list)
    tokens: list[TokenStats | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)  # why a row could not be tokenised
    contamination: list[tuple[str, str] | None] = field(default_factory=list)  # (eval row, shared words)

    @classmethod
    def join(cls, parts: list[Audit]) -> Audit:
        out = cls()
        for name in ("keys", "edit_keys", "pii", "tokens", "errors", "contamination"):
            setattr(out, name, [x for p in parts for x in getattr(p, name)])
        for name in ("signatures", "has_words"):
            arrays = [getattr(p, name) for p in parts if getattr(p, name) is not None]
            setattr(out, name, np.concatenate(arrays) if arrays else None)
        return out


def _side(enc: Encoded, max_length: int, eos: int) -> tuple[int, int, bool]:
    """(kept, trained, missing_eos) of one encoded sequence truncated to max_length."""
    kept_labels = enc.labels[:max_length]
    trained = len(kept_labels) - kept_labels.count(IGNORE)
    eos_all, eos_kept = enc.labels.count(eos), kept_labels.count(eos)  # trained EOS only: others are IGNORE
    return len(kept_labels), trained, trained > 0 and (eos_all == 0 or eos_kept < eos_all)


def token_stats(tokenizer, ex: Example, max_length: int, train_on: str) -> TokenStats:
    # Encoded once untruncated: the full length is what the histogram shows, and comparing the
    # trained EOS before and after the cut tells whether truncation removed one. A chat turn
    # ends with the template's end-of-turn token, a text document with the tokenizer's EOS.
    from tunesmith.data.templates import stop_tokens

    eos = tokenizer.eos_token_id if ex.kind == "text" else stop_tokens(tokenizer).end_of_turn_id
    if ex.kind == "preference":
        pair = encode_preference(tokenizer, ex, UNTRUNCATED)
        sides = [_side(e, max_length, eos) for e in (pair.chosen, pair.rejected)]
        lengths = (len(pair.chosen.input_ids), len(pair.rejected.input_ids))
        return TokenStats(max(lengths), sum(s[0] for s in sides), sum(s[1] for s in sides),
                          any(s[1] == 0 for s in sides), any(s[2] for s in sides), *lengths)
    enc = encode_example(tokenizer, ex, UNTRUNCATED, train_on)
    kept, trained, missing = _side(enc, max_length, eos)
    return TokenStats(len(enc.input_ids), kept, trained, trained == 0, missing)


_STATE: tuple = ()  # (examples, tokenizer, settings, eval index) in each worker


def _init(*state) -> None:
    global _STATE
    _STATE = state


def _worker_init(*state) -> None:
    # The parent handles Ctrl-C and SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt) and
    # stops the pool; workers must not print their own tracebacks for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init(*state)


def _tokens(tokenizer, ex: Example, s: AuditSettings) -> tuple[TokenStats | None, str | None]:
    if tokenizer is None:
        return None, None
    try:
        return token_stats(tokenizer, ex, s.max_length, s.train_on), None
    except DataError as exc:
        return None, str(exc)


def _audit_range(span: tuple[int, int]) -> Audit:
    examples, tokenizer, s, index = _STATE
    rows = examples[span[0]:span[1]]
    texts = [ex.all_text() for ex in rows]
    out = Audit(keys=[dedup.exact_key(t) for t in texts])
    if s.near:
        lines = [dedup.line_words(t) for t in texts]
        out.signatures, out.has_words = dedup.word_signatures([[w for ln in ls for w in ln] for ls in lines], s.num_perm,
                                                              s.shingle_size)
        out.edit_keys = [dedup.edit_keys(ls) for ls in lines]
    out.pii = [tuple(f.kind for f in pii.find(t)) if s.scan_pii else () for t in texts]
    out.contamination = [index.match(t) if index is not None else None for t in texts]
    for ex in rows:
        stats, error = _tokens(tokenizer, ex, s)
        out.tokens.append(stats)
        out.errors.append(error)
    return out


class Progress:
    """A line on stderr at most every few seconds, so long audits show they are moving."""

    def __init__(self, label: str, total: int, every_s: float = 3.0, stream=None):
        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        # The closing line only when lines were shown or the work took a noticeable while.
        if now - self.last >= self.every_s or (done == self.total and now - self.start >= 1.0):
            rate = done / max(now - self.start, 1e-9)
            print(f"  {self.label}: {done}/{self.total} rows ({rate:,.0f} rows/s)", file=self.stream, flush=True)
            self.last = now


@contextmanager
def _pool(workers: int, state: tuple):
    import datasketch  # noqa: F401  imported once here, not once per worker (it pulls in scipy)

    # fork shares the parent's memory; elsewhere the state is pickled once per worker.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Rust threads do not survive a fork
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=state)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


@contextmanager
def _in_process(state: tuple):
    _init(*state)
    try:
        yield None
    finally:
        _init()  # do not keep the examples alive after the audit


def audit(examples: list[Example], tokenizer, settings: AuditSettings, index: EvalIndex | None = None,
          workers: int = 0, label: str = "auditing") -> Audit:
    """Audit every row; workers=0 uses every core, 1 runs in this process."""
    state = (examples, tokenizer, settings, index)
    spans = [(i, min(i + CHUNK, len(examples))) for i in range(0, len(examples), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(spans))
    progress, parts, done = Progress(label, len(examples)), [], 0
    with _pool(workers, state) if workers > 1 else _in_process(state) as pool:
        for part in (map(_audit_range, spans) if pool is None else pool.imap(_audit_range, spans)):
            parts.append(part)
            done += len(part.keys)
            progress.update(done)
    return Audit.join(parts)
