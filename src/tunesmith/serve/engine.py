"""The serving engine: requests for the base model and any number of its LoRA adapters, decoded
together in continuously batched steps on one background thread.

One scheduler thread owns the model. Each iteration it runs queued commands (adapter load and
unload), admits waiting requests up to `max_batch` rows (when idle it waits `batch_wait_ms` after
the first so a burst shares one prefill), prefills them, and advances every running row by one
token. A row leaves the batch as soon as it ends (EOS, stop string, max_tokens, cancel), so new
requests join at step boundaries instead of waiting for the whole batch. Rows of different LoRA
adapters and of the base share a batch (serve/multi_lora.py: one gathered low-rank product per
layer); DoRA and other adapters it cannot stack get a batch of their own (PEFT). Each row has its
own sampling settings and RNG.

A failure in the model fails only the requests it belongs to: a prefill that raises is retried
half by half, a step that raises is undone and its batch split in two (repeated failures bisect
down to the bad rows), and a row whose sampling or text fails ends alone. Rows run in any batch
compute what they would alone, so the others' outputs do not change. A row ends at the end of
turn or EOS of its model's tokenizer (data/templates.stop_ids) or a stop string. Prompt heads
already seen (per adapter) are not computed again: serve/prefix_cache.py.
"""
from __future__ import annotations

import copy
import logging
import queue
import secrets
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.data.templates import stop_ids
from tunesmith.errors import DataError, ModelError, TunesmithError
from tunesmith.serve.adapters import AdapterDir, LoadedAdapters
from tunesmith.serve.batch import KVBatch, check_servable
from tunesmith.serve.decode import RowText, choose, make_generator
from tunesmith.serve.handle import Completion, Delta, Handle
from tunesmith.serve.logprobs import MAX_TOP_CHAT, TokenLogprob, pick, prefill_parts, prompt_entries
from tunesmith.serve.prefix_cache import DEFAULT_MB, for_model
from tunesmith.serve.threads import off_main_thread

log = logging.getLogger("tunesmith.serve")
__all__ = ["Completion", "Delta", "Engine", "GenRequest", "Handle", "off_main_thread"]
MIXED = "__mixed__"  # batch key for rows the base and plain-LoRA adapters share


@dataclass
class GenRequest:
    prompt_ids: list[int]
    model: str
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None     # report each generated token's logprob and the k most likely (k)
    prompt_logprobs: bool = False   # report the prompt's own logprobs too (max_tokens 0: nothing else)


@dataclass
class _Row:
    req: GenRequest
    handle: Handle
    adapter: str | None
    text: RowText
    eos: frozenset[int]
    limit: int
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every generated token's (when asked)
    unsent: int = 0                                             # of those, not yet in a Delta
    prompt_logprobs: list[TokenLogprob] | None = None


class Engine:
    def __init__(self, model, tokenizer, base_name: str, adapters_dir: Path | str | None = None,
                 max_batch: int = 32, batch_wait_ms: float = 5.0, preload: bool = False,
                 prefix_cache_mb: float = DEFAULT_MB):
        _check_model(model)
        model.eval()
        self.base_name, self.tokenizer = base_name, tokenizer
        self.max_batch, self.batch_wait = max(1, int(max_batch)), max(0.0, batch_wait_ms) / 1000
        # a folder, or an object with AdapterDir's names() / locate() (jobs/models.py: tuned jobs)
        self.dir = adapters_dir if hasattr(adapters_dir, "locate") else AdapterDir(adapters_dir)
        self.adapters = LoadedAdapters(model)
        self.device = next(model.parameters()).device
        self.context = getattr(model.config, "max_position_embeddings", None)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab = getattr(text_config, "vocab_size", None) or len(tokenizer)  # sizes echo prefills
        self._gen_config = getattr(model, "generation_config", None)
        self._tokenizers: dict[str, object] = {}
        self._decoders: dict[str, object] = {}
        self._pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self._lock = threading.Lock()   # the tokenizer cache
        self._gate = threading.Lock()   # submit vs close
        self._inbox: queue.Queue = queue.Queue()
        self._batches: dict[str, KVBatch] = {}
        self._rows: dict[str, list[_Row]] = {}
        self._waiting: list[_Row] = []            # admitted later: batch full, or their adapter is unloading
        self._unloading: dict[str, list[Future]] = {}
        self._after: list[tuple] = []             # commands to run once this iteration's rows are in
        self._thread: threading.Thread | None = None
        self._closing = False
        self._splits = 0                          # batches split off to isolate a failing row
        # prefills, decode steps, the most rows one step ran, rows decoded over all steps
        self.stats = {"prefills": 0, "steps": 0, "max_rows": 0, "row_steps": 0}
        self.prefix = for_model(model.config, prefix_cache_mb, self.stats)  # None: off (adds prefix_* stats)
        if preload:
            for name in self.dir.names():
                self.load_adapter(name)

    # ------------------------------------------------------------------ public API (any thread)

    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="tunesmith-serve", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            with self._gate:
                self._closing = True
                self._inbox.put(None)
            self._thread.join()
            self._thread = None
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _Row):
                self._waiting.append(item)
            elif isinstance(item, tuple):
                self._after.append(item)
        closed = TunesmithError("the server is shutting down")
        for row in self._waiting + [r for rows in self._rows.values() for r in rows]:
            row.handle._fail(closed)
        for fut in [c[2] for c in self._after] + [f for futs in self._unloading.values() for f in futs]:
            fut.set_exception(closed)
        self._waiting, self._rows, self._batches, self._after, self._unloading = [], {}, {}, [], {}

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self) -> list[str]:
        return [self.base_name] + [n for n in self.dir.names() if n != self.base_name]

    def active(self) -> int:
        """Rows running now (not counting queued requests)."""
        return self._active()

    def loaded(self) -> list[str]:
        """The adapters currently in memory."""
        return sorted(self.adapters.kinds)

    def is_loaded(self, model: str) -> bool:
        """Whether the adapter served as `model` is in memory (its name in the engine may differ:
        a job's ft:... model is keyed by its job id)."""
        try:
            return self.dir.locate(model, self.models).name in self.adapters.kinds
        except ModelError:
            return False

    def tokenizer_for(self, model: str):
        """The tokenizer (and chat template) requests for `model` are rendered with: a run's own
        tokenizer, one saved beside an adapter, or the base's."""
        if model == self.base_name:
            return self.tokenizer
        with self._lock:
            if model not in self._tokenizers:
                src = self.dir.locate(model, self.models)
                self._tokenizers[model] = _load_tokenizer(src.tokenizer_path) if src.tokenizer_path else self.tokenizer
            return self._tokenizers[model]

    def _decoder(self, model: str):
        """A private copy of the model's tokenizer for the scheduler thread's decoding: callers
        encode with tokenizer_for() on their own threads, and a Rust tokenizer used from two
        threads at once can fail ("Already borrowed")."""
        tok = self.tokenizer_for(model)
        with self._lock:
            if model not in self._decoders:
                self._decoders[model] = copy.deepcopy(tok)
            return self._decoders[model]

    def load_adapter(self, name: str) -> None:
        if name == self.base_name:
            return
        self._command("load", self.dir.locate(name, self.models).name)

    def unload_adapter(self, name: str) -> None:
        """Frees the adapter once no running row uses it (a later request loads it again)."""
        if name == self.base_name:
            raise ModelError(f"'{name}' is the base model, not an adapter")
        self._command("unload", self.dir.locate(name, self.models).name)
        with self._lock:
            self._tokenizers.pop(name, None)
            self._decoders.pop(name, None)

    def submit(self, req: GenRequest) -> Handle:
        row = self._make_row(req)
        with self._gate:  # close() cannot slip between the check and the put
            if self._thread is None or self._closing:
                raise TunesmithError("the engine is not running (call Engine.start() first)")
            self._inbox.put(row)
        return row.handle

    # ------------------------------------------------------------------ request checks

    def _make_row(self, req: GenRequest) -> _Row:
        adapter = None if req.model == self.base_name else self.dir.locate(req.model, self.models).name
        n = len(req.prompt_ids)
        if n == 0:
            raise DataError("the prompt is empty: it must hold at least one token")
        if self.context and n >= self.context:
            raise DataError(f"the prompt is {n} tokens; this model's context is {self.context} tokens")
        if req.max_tokens < 0:  # 0: the prompt is only prefilled (scored, with prompt_logprobs)
            raise DataError(f"max_tokens must be at least 0 (got {req.max_tokens})")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_CHAT:
            raise DataError(f"logprobs must be in 0..{MAX_TOP_CHAT} (got {req.logprobs})")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise DataError(f"temperature must be >= 0 and top_p in (0, 1] (got {req.temperature}, {req.top_p})")
        tok = self._decoder(req.model)
        limit = min(req.max_tokens, self.context - n) if self.context else req.max_tokens
        sampled = req.temperature > 0
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return _Row(req, Handle(n), adapter, RowText(tok, list(req.stop)),
                    frozenset(stop_ids(tok, self._gen_config)), limit,
                    make_generator(seed % 2 ** 64) if sampled else None)

    # ------------------------------------------------------------------ scheduler thread

    def _command(self, kind: str, name: str) -> None:
        """Run an adapter command on the scheduler thread (the only one that touches the model)
        and wait for it; directly when the engine is not running."""
        fut: Future = Future()
        if self._thread is None:
            self._run_command(kind, name, fut)
        else:
            self._inbox.put((kind, name, fut))
        fut.result()

    def _run_command(self, kind: str, name: str, fut: Future) -> None:
        try:
            if kind == "load":
                self.adapters.load(self.dir.locate(name))
            elif self._in_use(name):
                self._unloading.setdefault(name, []).append(fut)  # done when its rows end
                return
            else:
                self._unload(name)
        except BaseException as exc:  # handed to the caller's thread
            fut.set_exception(exc)
            return
        fut.set_result(None)

    def _in_use(self, name: str) -> bool:
        return any(r.adapter == name for rows in self._rows.values() for r in rows)

    def _unload(self, name: str) -> None:
        self.adapters.unload(name)
        if self.prefix is not None:  # a later adapter of that name may differ
            self.prefix.drop(name)

    def _finish_unloads(self) -> None:
        for name in [n for n in self._unloading if not self._in_use(n)]:
            self._unload(name)
            for fut in self._unloading.pop(name):
                fut.set_result(None)

    def _loop(self) -> None:
        while not self._closing:
            try:
                self._finish_unloads()
                new = self._collect()
                if new:
                    self._admit(new)
                while self._after:
                    self._run_command(*self._after.pop(0))
                for key in list(self._rows):
                    self._step(key)
            except Exception as exc:  # noqa: BLE001 - a bug in the scheduler itself (a model's failure is
                # isolated to its rows in _prefill / _step / _advance): end what is running, keep serving
                for rows in self._rows.values():
                    for row in rows:
                        row.handle._fail(exc)
                self._rows, self._batches = {}, {}

    def _active(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def _collect(self) -> list[_Row]:
        """Requests to admit now: waiting ones first, then the inbox (commands run as met)."""
        import time

        free = self.max_batch - self._active()
        rows, self._waiting = self._waiting, []
        deadline = None
        while True:
            if self._closing:
                break
            idle = self._active() == 0 and not rows
            try:
                if idle:
                    item = self._inbox.get(timeout=0.5)
                elif deadline is not None and time.monotonic() < deadline:
                    item = self._inbox.get(timeout=deadline - time.monotonic())
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                if idle:
                    continue
                break
            if item is None:
                break
            if isinstance(item, tuple):
                if rows:  # after the requests queued before it are running (an unload waits for them)
                    self._after.append(item)
                else:
                    self._run_command(*item)
                continue
            rows.append(item)
            if deadline is None and self._active() == 0:
                deadline = time.monotonic() + self.batch_wait  # a burst shares one prefill
            if len(rows) >= free:
                break
        admit = []
        for row in rows:
            if row.handle.cancelled:
                row.handle._finish_cancelled(0)
            elif row.adapter in self._unloading or len(admit) >= free:
                self._waiting.append(row)
            else:
                admit.append(row)
        return admit

    def _admit(self, rows: list[_Row]) -> None:
        groups: dict[str, list[_Row]] = {}
        for row in rows:
            try:
                if row.adapter is not None:
                    self.adapters.load(self.dir.locate(row.adapter))
            except TunesmithError as exc:
                row.handle._fail(exc)
                continue
            key = MIXED if row.adapter is None or self.adapters.kinds[row.adapter] else row.adapter
            groups.setdefault(key, []).append(row)
        for key, group in groups.items():
            if key not in self._batches:
                self._batches[key] = KVBatch(self.adapters.forward, self._pad_id, self.device)
                self._rows[key] = []
            plain = [r for r in group if not r.req.prompt_logprobs]
            echo = [r for r in group if r.req.prompt_logprobs]
            if plain:
                self._prefill(key, plain)
            # rows that want their prompt's logprobs need every position's logits: prefilled apart,
            # in parts small enough that those logits fit in memory
            for part in prefill_parts([len(r.req.prompt_ids) for r in echo], self.vocab):
                self._prefill(key, [echo[i] for i in part])
            if not self._rows[key]:
                del self._rows[key], self._batches[key]

    def _prefill(self, key: str, group: list[_Row]) -> None:
        """Prefill new rows into batch `key`. When that raises, each half is tried on its own, so a
        bad row (or adapter) fails only its own request; the rows already running are untouched."""
        every = any(r.req.prompt_logprobs for r in group)
        batch = self._batches[key]
        # rows that want prompt logprobs need every prompt position's logits: never from the cache
        heads = None
        if self.prefix is not None and not every:
            heads = [self.prefix.lookup(r.adapter, r.req.prompt_ids) for r in group]
        try:
            logits = batch.prefill([r.req.prompt_ids for r in group], [r.adapter for r in group],
                                   every_position=every, heads=heads)
        except Exception as exc:  # noqa: BLE001 - handed to the request's caller
            if len(group) == 1:
                group[0].handle._fail(exc)
                return
            for half in (group[:len(group) // 2], group[len(group) // 2:]):
                self._prefill(key, half)
            return
        self._rows[key] += group
        self.stats["prefills"] += 1
        if self.prefix is not None:
            self._remember(batch, group)
        full = None
        if every:
            full, logits = logits, logits[:, -1, :].float()
        self._advance(key, logits, start=len(self._rows[key]) - len(group), full=full)

    def _remember(self, batch: KVBatch, group: list[_Row]) -> None:
        """Put the full blocks of the rows just prefilled (the batch's last rows) in the prefix cache."""
        first = len(batch) - len(group)
        try:
            for i, row in enumerate(group, first):
                self.prefix.store(row.adapter, row.req.prompt_ids, lambda a, b, i=i: batch.row_kv(i, a, b))
        except Exception:  # noqa: BLE001 - a cache that cannot grow must not fail the requests
            log.warning("prefix cache: storing a prompt's blocks failed; the cache is cleared", exc_info=True)
            self.prefix.clear()

    def _step(self, key: str) -> None:
        live = [i for i, r in enumerate(self._rows[key]) if not r.handle.cancelled]
        self._keep(key, live)
        if key not in self._rows:
            return
        try:
            logits = self._batches[key].step([r.tokens[-1] for r in self._rows[key]])
        except Exception as exc:  # noqa: BLE001 - handed to the request's caller
            self._isolate(key, exc)
            return
        n = len(self._rows[key])
        self.stats.update(steps=self.stats["steps"] + 1, max_rows=max(self.stats["max_rows"], n),
                          row_steps=self.stats["row_steps"] + n)
        self._advance(key, logits)

    def _isolate(self, key: str, exc: Exception) -> None:
        """A step of batch `key` raised (and left the batch as it was): a lone row fails with the
        error; a larger batch is split in two, each half stepped on its own from the next iteration,
        so repeated failures bisect down to the bad rows and every other row goes on unchanged."""
        rows = self._rows[key]
        if len(rows) == 1:
            rows[0].handle._fail(exc)
            self._keep(key, [])
            return
        half = list(range(len(rows) // 2, len(rows)))
        self._splits += 1
        new = f"{key}#{self._splits}"  # never a key new requests are admitted to
        self._batches[new] = self._batches[key].split(half)
        self._rows[new], self._rows[key] = [rows[i] for i in half], rows[:len(rows) // 2]

    def _advance(self, key: str, logits: torch.Tensor, start: int = 0, full: torch.Tensor | None = None) -> None:
        """Choose each row's next token from logits (rows start.. of the batch) and end the rows
        that are done. full: every position's logits of a prefill (rows that want prompt logprobs)."""
        rows = self._rows[key]
        done = set()
        for i, token in enumerate(choose(logits, [(r.req.temperature, r.req.top_p, r.gen) for r in rows[start:]]),
                                  start):
            row = rows[i]
            try:
                if full is not None and row.req.prompt_logprobs:
                    row.prompt_logprobs = prompt_entries(full[i - start], row.req.prompt_ids, row.req.logprobs or 0)
                    row.handle._push(Delta("", None, prompt_logprobs=row.prompt_logprobs))  # streamed first
                if row.limit == 0:  # only the prompt was to be scored
                    row.handle._finish(Delta("", "length"), self._completion(row, "length"))
                    done.add(i)
                    continue
                if isinstance(token, Exception):  # this row's sampling failed (choose says why)
                    raise token
                if row.req.logprobs is not None:
                    row.logprobs += pick(logits[i - start:i - start + 1], [token], row.req.logprobs)
                    row.unsent += 1
                ended = self._emit(row, token)
            except Exception as exc:  # noqa: BLE001 - handed to the request's caller; the others go on
                rows[i].handle._fail(exc)
                ended = True
            if ended:
                done.add(i)
        if done:
            self._keep(key, [i for i in range(len(rows)) if i not in done])

    def _keep(self, key: str, keep: list[int]) -> None:
        rows = self._rows[key]
        for i in set(range(len(rows))) - set(keep):
            if rows[i].handle.cancelled and not rows[i].handle.done:
                rows[i].handle._finish_cancelled(len(rows[i].tokens))
        self._batches[key].keep(keep)
        self._rows[key] = [rows[i] for i in keep]
        if not keep:
            del self._rows[key], self._batches[key]

    @staticmethod
    def _completion(row: _Row, reason: str) -> Completion:
        return Completion(row.text.text, reason, row.handle.prompt_tokens, len(row.tokens), list(row.tokens),
                          logprobs=list(row.logprobs) if row.req.logprobs is not None else None,
                          prompt_logprobs=row.prompt_logprobs)

    @staticmethod
    def _unsent(row: _Row) -> list[TokenLogprob] | None:
        """The logprobs of the tokens not yet in a Delta: they go with the next one."""
        if row.req.logprobs is None:
            return None
        out = row.logprobs[len(row.logprobs) - row.unsent:]
        row.unsent = 0
        return out

    @classmethod
    def _emit(cls, row: _Row, token: int) -> bool:
        """Record a token; stream its text; True when the row has ended."""
        row.tokens.append(token)
        if token in row.eos:
            reason, piece = "stop", row.text.flush()
        else:
            piece, stopped = row.text.add(token)
            if stopped:
                reason = "stop"
            elif len(row.tokens) >= row.limit:
                reason, piece = "length", piece + row.text.flush()
            else:
                if piece:
                    row.handle._push(Delta(piece, None, cls._unsent(row)))
                return False
        row.handle._finish(Delta(piece, reason, cls._unsent(row)), cls._completion(row, reason))
        return True


def _load_tokenizer(path: Path):
    from tunesmith.data.tokenize import ensure_chat_template
    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer(path)
    ensure_chat_template(tok)
    return tok


def _check_model(model) -> None:
    """Rows are merged and trimmed by editing the KV cache column by column: full-attention and
    sliding-window layers allow that (serve/batch.py says why); other layer kinds are refused."""
    check_servable(model.config)
