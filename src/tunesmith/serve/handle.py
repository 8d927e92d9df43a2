"""What a caller holds for a submitted request: its streamed pieces, its result, a way to cancel.
Written by the engine's scheduler thread, read from any thread (blocking) or event loop (async)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from tunesmith.serve.logprobs import TokenLogprob


@dataclass
class Delta:
    text: str                   # new text since the previous Delta (may be "" on the final one)
    finish_reason: str | None   # None while running; "stop", "length" (or "cancelled") at the end
    logprobs: list[TokenLogprob] | None = None  # tokens generated since the previous Delta (when asked)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's, in a Delta of their own before any text


@dataclass
class Completion:
    text: str
    finish_reason: str          # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int      # tokens generated, the EOS that ended the row included
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None         # one per generated token (GenRequest.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (GenRequest.prompt_logprobs)


class Handle:
    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._wakers: list = []  # callbacks that wake async readers on their own event loop

    # ---------------------------------------------------------------- reader side

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """The client went away: the row leaves its batch at the next step."""
        self._cancel.set()

    def _next(self, i: int) -> tuple[list[Delta], bool]:
        """Deltas from index i, and whether the stream has ended (raises the row's error)."""
        if self._error is not None and i >= len(self._deltas):
            raise self._error
        return self._deltas[i:], self.done and self._error is None

    def stream(self) -> Iterator[Delta]:
        """Blocking: every Delta in order; ends after the one with finish_reason set."""
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._deltas) > i or self._error is not None)
                new, ended = self._next(i)
            i += len(new)
            yield from new
            if ended and i >= len(self._deltas):
                return

    def result(self) -> Completion:
        """Blocking: the finished completion (its text is the stream's pieces joined)."""
        with self._cond:
            self._cond.wait_for(lambda: self.done)
        if self._error is not None:
            raise self._error
        return self._completion

    async def astream(self) -> AsyncIterator[Delta]:
        """stream() for an asyncio caller, without holding a thread per request."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has closed: nobody is reading any more
                pass

        with self._cond:
            self._wakers.append(wake)
        try:
            i = 0
            while True:
                event.clear()
                with self._cond:
                    new, ended = self._next(i)
                i += len(new)
                for delta in new:
                    yield delta
                if ended and i >= len(self._deltas):
                    return
                if not new:
                    await event.wait()
        finally:
            with self._cond:
                self._wakers.remove(wake)

    async def aresult(self) -> Completion:
        async for _ in self.astream():
            pass
        return self._completion

    # ---------------------------------------------------------------- engine side

    def _notify(self) -> None:
        self._cond.notify_all()
        for wake in list(self._wakers):
            wake()

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._notify()

    def _finish(self, delta: Delta, completion: Completion) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._completion = completion
            self._notify()

    def _finish_cancelled(self, generated: int) -> None:
        text = "".join(d.text for d in self._deltas)
        self._finish(Delta("", "cancelled"), Completion(text, "cancelled", self.prompt_tokens, generated))

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.done:
                return
            self._error = exc
            self._notify()
