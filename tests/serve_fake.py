"""A fake serving engine for the HTTP app's tests: the engine interface the app uses (models,
tokenizer_for, submit -> handle with astream/aresult/cancel, load/unload_adapter) with a
deterministic "model" whose reply is a function of the request, so every field the app forwards
can be checked exactly; plus helpers that check OpenAI error JSON and parse server-sent events."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

from conftest import CHATML, build_tokenizer
from tunesmith.errors import ModelError
from tunesmith.serve.engine import Completion, Delta

ALT = ("{% for m in messages %}{{'### ' + m['role'] + ': ' + m['content'] + '\n'}}{% endfor %}"
       "{% if add_generation_prompt %}{{'### assistant:'}}{% endif %}")
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet", "kilo"]
EOS_AFTER = 20  # the fake model ends its reply (as at EOS) after this many words
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
KEY = "s3cret-key"


def fake_words(req) -> list[str]:
    """The fake model's reply: greedy ignores the seed; sampling mixes it in."""
    salt = (req.seed or 0) if req.temperature > 0 else 0
    return [WORDS[(sum(req.prompt_ids) + 7 * k + salt) % len(WORDS)] for k in range(min(req.max_tokens, EOS_AFTER))]


def fake_completion(req) -> Completion:
    words = fake_words(req)
    text = "".join(" " + w for w in words)
    cuts = [text.find(s) for s in req.stop if s in text]
    if cuts:
        text = text[:min(cuts)]
        reason = "stop"
    else:
        reason = "length" if req.max_tokens <= EOS_AFTER else "stop"
    return Completion(text, reason, len(req.prompt_ids), len(words))


class FakeHandle:
    def __init__(self, engine, req):
        self.engine, self.req, self.cancelled = engine, req, False
        self.final = fake_completion(req)

    def cancel(self):
        if not self.cancelled:
            self.cancelled = True
            self.engine.cancelled.append(self.req)

    async def astream(self):
        if self.req.model == "explode":
            raise RuntimeError("the fake engine broke")
        if self.req.model == "badload":  # accepted, then its adapter fails to load in the scheduler
            raise ModelError("adapter 'badload' does not load onto this base model: shape mismatch")
        text = self.final.text
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)] or [""]  # pieces unlike words on purpose
        for k, piece in enumerate(pieces):
            await asyncio.sleep(self.engine.delay)
            if self.cancelled:
                yield Delta("", "cancelled")
                return
            # the last piece comes with the finish reason, as the real engine sends it
            yield Delta(piece, self.final.finish_reason if k == len(pieces) - 1 else None)

    async def aresult(self):
        async for _ in self.astream():
            pass
        return self.final


class FakeEngine:
    def __init__(self, delay: float = 0.0):
        self.toks = {"base": build_tokenizer(CHATML), "alt": build_tokenizer(ALT)}
        self.requests, self.cancelled, self.admin, self.delay = [], [], [], delay

    def models(self):
        return ["base", "alt", "broken", "explode", "badload"]

    def tokenizer_for(self, model):
        if model == "broken":
            raise ModelError("adapter 'broken' does not load onto this base model: size mismatch")
        if model not in self.models():
            raise ModelError(f"unknown model '{model}'")
        return self.toks.get(model, self.toks["base"])

    def submit(self, req):
        self.tokenizer_for(req.model)
        self.requests.append(req)
        return FakeHandle(self, req)

    def load_adapter(self, name):
        self.tokenizer_for(name)
        self.admin.append(("load", name))

    def unload_adapter(self, name):
        self.admin.append(("unload", name))

    def loaded(self):
        state = {}
        for action, name in self.admin:
            state[name] = action == "load"
        return sorted(n for n, up in state.items() if up)

    def is_loaded(self, model):
        return model in self.loaded()


def assert_error(resp, status, param=None, words=()):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]


def sse(resp) -> list:
    """The data of each server-sent event; '[DONE]' kept as a string."""
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """`app` on a uvicorn thread on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
