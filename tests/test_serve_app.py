"""The OpenAI-compatible HTTP app over a fake engine: protocol, parameters reaching the engine,
each model's own chat template, streaming, auth, limits, error shapes, a fuzz test of malformed
requests (never a 5xx), and client disconnects cancelling generation. The fake engine
(serve_fake.py) answers deterministically, so every field the app forwards is checked exactly.
End-to-end tests with the real engine and real clients are in test_serve_clients.py."""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serve_fake import (EOS_AFTER, KEY, MSGS, FakeEngine, assert_error, fake_completion, fake_words, free_port,
                        sse)
from tunesmith.data.tokenize import prompt_ids
from tunesmith.errors import ConfigError
from tunesmith.serve.app import build_app, load_engine, serve
from tunesmith.serve.checks import Limits


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    engine.requests.clear()
    engine.cancelled.clear()
    engine.delay = 0.0
    with TestClient(build_app(engine, limits=Limits(max_body_bytes=4096, max_prompt_tokens=200,
                                                   max_tokens_limit=64, max_n=4, context_length=240))) as c:
        yield c


# ----------------------------------------------------------------------------- protocol

def test_models_list_and_single_model(client, engine):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == engine.models()
    assert all(m["object"] == "model" for m in body["data"])
    assert client.get("/v1/models/alt").json()["id"] == "alt"
    err = assert_error(client.get("/v1/models/nope"), 404, "model", ["nope", "base, alt"])
    assert err["code"] == "model_not_found"


def test_chat_renders_each_models_own_chat_template(client, engine):
    seen = {}
    for model in ("base", "alt"):
        resp = client.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 5,
                                                         "temperature": 0})
        assert resp.status_code == 200, resp.text
        req = engine.requests[-1]
        expected = prompt_ids(engine.toks[model], MSGS)
        assert req.prompt_ids == expected
        assert resp.json()["usage"]["prompt_tokens"] == len(expected)
        seen[model] = engine.toks[model].decode(req.prompt_ids)
    assert seen["base"].startswith("<|im_start|>system\nBe brief.") and seen["base"].endswith("<|im_start|>assistant\n")
    assert seen["alt"] == "### system: Be brief.\n### user: Hello there.\n### assistant:"


def test_chat_forwards_sampling_fields_and_answers_in_openai_shape(client, engine):
    body = {"model": "alt", "messages": MSGS, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9,
            "stop": ["zz", "qq"], "seed": 11, "user": "u1", "presence_penalty": 0, "logprobs": False,
            "frequency_penalty": 0.0, "response_format": {"type": "text"}, "store": False, "tool_choice": "none"}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    req = engine.requests[-1]
    assert (req.model, req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == \
        ("alt", 7, 0.7, 0.9, ["zz", "qq"], 11)
    out, want = resp.json(), fake_completion(req)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "alt"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": want.text},
                               "logprobs": None, "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 7,
                            "total_tokens": len(req.prompt_ids) + 7}


def test_defaults_stop_string_and_max_completion_tokens(client, engine):
    client.post("/v1/chat/completions", json={"model": "base", "messages": MSGS})
    assert engine.requests[-1].max_tokens == 64  # default 256, capped by the server's max_tokens limit
    assert engine.requests[-1].temperature == 1.0  # OpenAI's default
    client.post("/v1/completions", json={"model": "base", "prompt": "Hi"})
    assert engine.requests[-1].max_tokens == 16  # OpenAI's completions default
    client.post("/v1/chat/completions", json={"model": "base", "messages": MSGS, "max_completion_tokens": 9})
    assert engine.requests[-1].max_tokens == 9
    greedy = {"model": "base", "messages": MSGS, "temperature": 0, "max_tokens": 30}
    words = fake_words(type("R", (), {**greedy, "prompt_ids": prompt_ids(engine.toks["base"], MSGS), "seed": None})())
    stop = " " + words[3]  # the reply must end just before the 4th word
    out = client.post("/v1/chat/completions", json={**greedy, "stop": stop}).json()
    assert engine.requests[-1].stop == [stop]
    assert out["choices"][0]["message"]["content"] == "".join(" " + w for w in words[:3])
    assert out["choices"][0]["finish_reason"] == "stop"
    ended = client.post("/v1/chat/completions", json=greedy).json()  # the fake's EOS comes after 20 words
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] == EOS_AFTER


def test_n_choices_offset_seeds_and_count_prompt_once(client, engine):
    resp = client.post("/v1/chat/completions", json={"model": "base", "messages": MSGS, "n": 3, "seed": 5,
                                                     "temperature": 0.8, "max_tokens": 4})
    out = resp.json()
    reqs = engine.requests[-3:]
    assert [r.seed for r in reqs] == [5, 6, 7]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["choices"]] == [fake_completion(r).text for r in reqs]
    assert len({c["message"]["content"] for c in out["choices"]}) > 1  # sampled choices differ
    assert out["usage"]["prompt_tokens"] == len(reqs[0].prompt_ids) and out["usage"]["completion_tokens"] == 12


def test_completions_accept_every_prompt_form(client, engine):
    tok = engine.toks["base"]
    forms = {"Hello there.": [tok("Hello there.")["input_ids"]],
             "list": (["Hi", "Paris is"], [tok("Hi")["input_ids"], tok("Paris is")["input_ids"]]),
             "ids": ([5, 6, 7], [[5, 6, 7]]), "id lists": ([[5, 6], [9]], [[5, 6], [9]])}
    for name, form in forms.items():
        prompt, want = form if isinstance(form, tuple) else (name, form)
        out = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "n": 2, "max_tokens": 3,
                                                   "temperature": 0}).json()
        reqs = engine.requests[-2 * len(want):]
        assert [r.prompt_ids for r in reqs] == [ids for ids in want for _ in range(2)], name
        assert out["object"] == "text_completion"
        assert [c["text"] for c in out["choices"]] == [fake_completion(r).text for r in reqs]
        assert [c["index"] for c in out["choices"]] == list(range(2 * len(want)))
        assert out["usage"]["prompt_tokens"] == sum(len(ids) for ids in want)
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": [1, 10 ** 6]}), 400, "prompt",
                 ["outside the vocabulary"])
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": ""}), 400, "prompt", ["empty"])
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": []}), 400, "prompt")


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_joins_to_the_non_stream_reply(client, n):
    body = {"model": "alt", "messages": MSGS, "max_tokens": 9, "temperature": 0, "n": n}
    whole = client.post("/v1/chat/completions", json=body).json()
    resp = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse(resp)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    for i in range(n):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == whole["choices"][i]["finish_reason"] and mine[-1]["delta"] == {}
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert "".join(m["delta"].get("content", "") for m in mine) == whole["choices"][i]["message"]["content"]


def test_completions_stream_several_prompts(client):
    body = {"model": "base", "prompt": ["Hi", "Paris is"], "max_tokens": 5, "temperature": 0, "n": 2}
    whole = client.post("/v1/completions", json=body).json()
    events = sse(client.post("/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    for i in range(4):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert "".join(m["text"] for m in mine) == whole["choices"][i]["text"]
        assert mine[-1]["finish_reason"] == "length"


def test_engine_failures_are_server_errors_in_openai_shape(engine):
    with TestClient(build_app(engine), raise_server_exceptions=False) as c:
        body = {"model": "explode", "messages": MSGS}
        err = assert_error(c.post("/v1/chat/completions", json=body), 500)
        assert err["type"] == "server_error" and "RuntimeError" in err["message"]
        events = sse(c.post("/v1/chat/completions", json={**body, "stream": True}))
        assert events[-1]["error"]["type"] == "server_error"  # the status line had gone out: an error event
        body = {"model": "badload", "messages": MSGS}  # the request's problem, not the server's
        assert assert_error(c.post("/v1/chat/completions", json=body), 400, "model")["code"] == "model_unavailable"
        events = sse(c.post("/v1/chat/completions", json={**body, "stream": True}))
        assert "shape mismatch" in events[-1]["error"]["message"]
        real_models = engine.models
        engine.models = lambda: 1 / 0  # a bug anywhere still answers JSON, not a bare 500 page
        try:
            err = assert_error(c.get("/v1/models"), 500)
        finally:
            engine.models = real_models
        assert "ZeroDivisionError" in err["message"]


# ------------------------------------------------------------------------- auth, limits

def test_bearer_key_is_required_everywhere_but_health(engine):
    with TestClient(build_app(engine, api_key=KEY)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            resp = c.get("/v1/models", headers=headers)
            err = assert_error(resp, 401)
            assert err["type"] == "authentication_error" and resp.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/v1/chat/completions", json={"model": "base", "messages": MSGS}), 401)
        assert_error(c.post("/v1/adapters/alt/load"), 401)
        assert_error(c.get("/nowhere"), 401)  # no probing routes without the key
        assert c.get("/health").json() == {"status": "ok"}
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
        assert c.post("/v1/chat/completions", headers=ok, json={"model": "base", "messages": MSGS}).status_code == 200


def test_body_size_is_limited_before_parsing(client):
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * 5000}]}
    err = assert_error(client.post("/v1/chat/completions", json=big), 413, words=["4096"])
    assert err["code"] == "request_too_large"

    def chunked():  # no Content-Length: the bytes read are counted
        for _ in range(10):
            yield b" " * 1000
    resp = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(resp, 413)


def test_prompt_max_tokens_n_and_context_limits(client, engine):
    long = [{"role": "user", "content": "Deliver to Lyon, attention Grace Mori. " * 30}]
    n_ids = len(prompt_ids(engine.toks["base"], long))
    assert n_ids > 200
    err = assert_error(client.post("/v1/chat/completions", json={"model": "base", "messages": long}), 400,
                       "messages", [str(n_ids), "200"])
    assert err["code"] == "context_length_exceeded"
    assert_error(client.post("/v1/chat/completions", json={"model": "base", "messages": MSGS, "max_tokens": 65}),
                 400, "max_tokens", ["65", "64"])
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 10 ** 30}),
                 400, "max_tokens")
    assert_error(client.post("/v1/chat/completions", json={"model": "base", "messages": MSGS, "n": 5}), 400, "n")
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": ["a", "b", "c"], "n": 2}),
                 400, "prompt")
    for k in range(1, 30):  # the shortest such prompt over 240 - 64 tokens
        fits = [{"role": "user", "content": "Deliver to Lyon. " * k}]
        m = len(prompt_ids(engine.toks["base"], fits))
        if m > 240 - 64:
            break
    assert 240 - 64 < m <= 200  # fits the prompt limit, but not with max_tokens=64 in a 240-token context
    assert_error(client.post("/v1/chat/completions", json={"model": "base", "messages": fits, "max_tokens": 64}),
                 400, "messages", ["240"])
    ok = client.post("/v1/chat/completions", json={"model": "base", "messages": fits, "max_tokens": 240 - m})
    assert ok.status_code == 200
    # without max_tokens the default (here the 64 limit) shrinks to the room left in the context
    assert client.post("/v1/chat/completions", json={"model": "base", "messages": fits}).status_code == 200
    assert engine.requests[-1].max_tokens == 240 - m


def test_too_many_generations_in_flight_get_429(engine):
    engine.delay = 0.05
    app = build_app(engine, limits=Limits(max_in_flight=2))
    with TestClient(app) as c:
        started = threading.Event()

        def slow():
            with c.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": MSGS, "n": 2,
                                                                "stream": True, "max_tokens": 6}) as r:
                for _ in r.iter_lines():
                    started.set()
        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(10)
        err = assert_error(c.post("/v1/chat/completions", json={"model": "base", "messages": MSGS}), 429)
        assert err["type"] == "rate_limit_error"
        t.join()
        assert app.state.service.in_flight == 0
        assert c.post("/v1/chat/completions", json={"model": "base", "messages": MSGS}).status_code == 200
    engine.delay = 0.0


# ----------------------------------------------------------------------------- errors

ERRORS = [  # (method, path, body or raw bytes, headers, status, param, words in the message)
    ("GET", "/v1/nowhere", None, {}, 404, None, ["no such endpoint"]),
    ("GET", "/v1/chat/completions", None, {}, 405, None, ["GET"]),
    ("PUT", "/v1/models", None, {}, 405, None, []),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": MSGS}, {}, 404, "model", ["base, alt"]),
    ("POST", "/v1/chat/completions", {"model": "broken", "messages": MSGS}, {}, 400, "model", ["size mismatch"]),
    ("POST", "/v1/chat/completions", {"model": "base"}, {}, 400, "messages", ["required"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": []}, {}, 400, "messages", []),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "max_tokn": 3}, {}, 400, "max_tokn",
     ["max_tokens"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "top_logprobs": 3}, {}, 400,
     "top_logprobs", ["logprobs"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "tools": [{"type": "function"}]}, {},
     400, "tools", ["tools"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "presence_penalty": 0.5}, {}, 400, "presence_penalty",
     ["presence_penalty"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "temperature": 3}, {}, 400,
     "temperature", []),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "tool", "content": "x"}]}, {}, 400,
     "messages[0].role", []),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": 5}]}, {}, 400,
     "messages[0].content", []),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "stop": ["a"] * 5}, {}, 400, "stop",
     ["4"]),
    ("POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 0}, {}, 400, "max_tokens",
     ["echo"]),
    ("POST", "/v1/completions", {"model": "base", "prompt": "x", "logprobs": 6}, {}, 400, "logprobs", ["5"]),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "response_format": {"type": "json_object"}},
     {}, 400, "response_format", []),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": MSGS, "stream_options": {"include_usage": True}},
     {}, 400, "stream_options", ["stream"]),
    ("POST", "/v1/chat/completions", b"", {"content-type": "application/json"}, 400, None, ["empty"]),
    ("POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"}, 400, None, ["JSON"]),
    ("POST", "/v1/chat/completions", b'{"model": "base", "messages": [], "temperature": NaN}',
     {"content-type": "application/json"}, 400, None, ["NaN"]),
    ("POST", "/v1/chat/completions", b"[1, 2]", {"content-type": "application/json"}, 400, None, ["object"]),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00", {"content-type": "application/json"}, 400, None, []),
    ("POST", "/v1/chat/completions", b"model=base", {"content-type": "application/x-www-form-urlencoded"}, 415,
     None, ["application/json"]),
    ("POST", "/v1/adapters/..%2Fetc/load", None, {}, 404, None, ["no such endpoint"]),  # a path is no name
    ("POST", "/v1/adapters/.hidden/load", None, {}, 400, "name", ["invalid adapter name"]),
    ("POST", "/v1/adapters/a%20b/unload", None, {}, 400, "name", ["invalid adapter name"]),
    ("POST", "/v1/adapters/nope/load", None, {}, 404, "model", []),
]


@pytest.mark.parametrize("method,path,body,headers,status,param,words", ERRORS)
def test_bad_requests_get_openai_error_json(client, method, path, body, headers, status, param, words):
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body} if body is not None else {}
    assert_error(client.request(method, path, headers=headers, **kwargs), status, param, words)


def test_accepted_harmless_fields_and_admin_endpoints(client, engine):
    body = {"model": "base", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Hi"}],
                                           "name": "dev"}, {"role": "user", "content": "Hello there."}],
            "logprobs": False, "presence_penalty": 0, "user": "me", "metadata": {"k": "v"},
            "parallel_tool_calls": True, "stream": False, "n": None, "seed": None, "top_p": None, "stop": None}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    conv = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hello there."}]
    assert engine.requests[-1].prompt_ids == prompt_ids(engine.toks["base"], conv)
    assert client.post("/v1/adapters/alt/load").json() == {"id": "alt", "object": "adapter", "status": "loaded"}
    listed = client.get("/v1/adapters").json()["data"]
    assert [(a["id"], a["loaded"]) for a in listed][:2] == [("alt", True), ("broken", False)]
    assert client.post("/v1/adapters/alt/unload").json()["status"] == "unloaded"
    assert client.get("/v1/adapters").json()["data"][0] == {"id": "alt", "object": "adapter", "loaded": False}
    assert engine.admin[-2:] == [("load", "alt"), ("unload", "alt")]


JUNK = [None, "", "x", -1, 0, 1.5, 10 ** 40, -10 ** 40, 1e308, True, [], {}, [[[]]], {"a": {"b": [1, {"c": None}]}},
        "\u0000", "\udcff", "é" * 50, [None], [{"role": "user"}], [{"content": "x"}], {"role": "user", "content": "x"},
        ["a"] * 6, [1, -5], [[1], ["x"]], {"include_usage": "maybe"}, "text" * 300]
COMMON = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed", "stream_options", "logprobs",
          "user"]
FIELDS = {"/v1/chat/completions": COMMON + ["messages", "tools", "response_format", "max_completion_tokens",
                                            "top_logprobs"],
          "/v1/completions": COMMON + ["prompt", "best_of", "echo", "suffix"]}


def _fuzz_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    valid = {"/v1/chat/completions": {"model": "base", "messages": MSGS, "max_tokens": 4},
             "/v1/completions": {"model": "base", "prompt": "Hi", "max_tokens": 4}}
    cases = []
    for _ in range(300):
        path = rng.choice(list(valid))
        body = dict(valid[path])
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            if op < 0.6:  # mostly the endpoint's own fields, so validation gets past "unknown field"
                names = FIELDS[path] if rng.random() < 0.9 else FIELDS["/v1/completions"] + FIELDS[path]
                body[rng.choice(names)] = rng.choice(JUNK)
            elif op < 0.75 and body:
                body.pop(rng.choice(list(body)))
            elif op < 0.85 and isinstance(body.get("messages"), list):
                body["messages"] = [{"role": "user", "content": rng.choice(JUNK)}]
            else:
                body[rng.choice(["stream", "n"])] = rng.choice([True, 2, 4])
        raw = json.dumps(body).encode()
        cut = rng.random()
        if cut < 0.1:
            raw = raw[:rng.randint(0, len(raw))]  # truncated JSON
        elif cut < 0.15:
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # noise
        cases.append((path, raw))
    deep = b"[" * 2000 + b"]" * 2000  # deeper than the JSON parser's recursion limit, within the body limit
    cases += [("/v1/chat/completions", deep), ("/v1/completions", b"null"), ("/v1/completions", b'"str"'),
              ("/v1/chat/completions", b"[" * 100_000), ("/v1/completions", b"{}"),
              ("/v1/chat/completions", b'{"model": "base", "messages": ' + b"[" * 1500 + b"]" * 1500 + b"}")]
    return cases


def test_fuzzed_requests_never_get_a_5xx(client):
    rng = random.Random(1234)
    statuses = {}
    for path, raw in _fuzz_bodies(rng):
        for ctype in ("application/json", "text/plain") if rng.random() < 0.1 else ("application/json",):
            resp = client.post(path, content=raw, headers={"content-type": ctype})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (path, raw[:200], resp.text[:300])
            if resp.status_code >= 400:
                assert_error(resp, resp.status_code)
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses  # both kinds were exercised


# ------------------------------------------------------------------------- disconnects

@pytest.fixture
def live_server(engine):
    """The app on a real uvicorn on loopback (a client that goes away closes a real socket)."""
    import uvicorn

    engine.requests.clear()
    engine.cancelled.clear()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    engine.delay = 0.0


def _wait_for(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(live_server, engine, stream):
    import httpx

    engine.delay = 0.2  # 60 pieces: 12 s if nobody cancelled it
    body = {"model": "base", "messages": MSGS, "max_tokens": 20, "stream": stream, "n": 2}
    if stream:
        with httpx.Client(base_url=live_server, timeout=10) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert next(r.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live_server}/v1/chat/completions", json=body, timeout=0.5)
    assert _wait_for(lambda: len(engine.cancelled) == 2), engine.cancelled
    assert engine.cancelled == engine.requests[-2:]


def test_serve_refuses_bad_settings_before_loading_anything(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "manifest.json").write_text("{}")
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="outside --adapters"):  # the run would silently not be served
        load_engine(run, tmp_path / "other", 4, tmp_path)
    with pytest.raises(ConfigError, match="--max-batch"):
        serve(run, max_batch=0)
