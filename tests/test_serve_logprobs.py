"""Logprobs in `tunesmith serve`: chat `logprobs`/`top_logprobs`, completions `logprobs`/`echo`
(max_tokens 0 scores the prompt alone), each value checked against log_softmax of a direct
transformers forward; the `openai` client parses the shapes; lm-eval's `local-completions` model
scores a multiple-choice task over HTTP with the same log-likelihoods and accuracy as `tunesmith
eval` on the same items."""
from __future__ import annotations

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import build_tokenizer, tiny_llama
from serve_fake import assert_error
from tunesmith.data.tokenize import prompt_ids
from tunesmith.errors import DataError
from tunesmith.serve.app import build_app
from tunesmith.serve.checks import Limits
from tunesmith.serve.engine import Engine, GenRequest
from tunesmith.serve.logprobs import TokenText

BASE = "tiny"
PROMPTS = ["Deliver to Lyon", "3 scarves, pink. Overnight delivery please.", "Hi"]
MSGS = [{"role": "user", "content": "Deliver to Lyon, attention Grace Mori: 3 scarves"}]
TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=11).eval()


@pytest.fixture(scope="module")
def engine(tok, model):
    with Engine(model, tok, BASE, max_batch=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, limits=Limits(max_tokens_limit=32, context_length=engine.context))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@torch.no_grad()
def reference(model, ids: list[int]) -> torch.Tensor:
    """log_softmax (float32) of a plain transformers forward: row j predicts ids[j + 1]."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_max_tokens_0_gives_every_prompt_tokens_logprob(client, tok, model):
    """Several prompts in one request (prefilled together, left-padded): each prompt's tokens'
    logprobs are those of its own forward, the first token's null, nothing generated."""
    r = client.post("/v1/completions", json={"model": BASE, "prompt": PROMPTS, "max_tokens": 0, "echo": True,
                                             "logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 0
    text_of = TokenText(tok)  # a token's text, or "bytes:\\xNN" for part of a character (OpenAI's form)
    for text, choice in zip(PROMPTS, body["choices"]):
        ids = tok(text)["input_ids"]
        ref = reference(model, ids)
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"] == [len(tok.decode(ids[:j])) for j in range(len(ids))]
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - float(ref[j - 1, ids[j]])) < TOL
            top = lp["top_logprobs"][j]
            vals, idx = ref[j - 1].topk(3)
            expected = {text_of(t)[0]: float(v) for t, v in zip(idx.tolist(), vals)}
            expected.setdefault(lp["tokens"][j], float(ref[j - 1, ids[j]]))  # up to k + 1: the chosen one too
            assert top.keys() == expected.keys()
            assert max(abs(top[s] - expected[s]) for s in top) < TOL


def test_echo_and_generated_tokens_as_lm_eval_reads_them(client, tok, model):
    """lm-eval's request (token ids, max_tokens 1, echo, logprobs 1, temperature 0): the prompt's
    logprobs, then the greedy token's, each equal to a forward over prompt + generated tokens."""
    ids = tok(PROMPTS[1])["input_ids"]
    for max_tokens in (1, 4):
        body = client.post("/v1/completions", json={"model": BASE, "prompt": [ids], "max_tokens": max_tokens,
                                                    "echo": True, "logprobs": 1, "temperature": 0}).json()
        lp = body["choices"][0]["logprobs"]
        n = len(lp["tokens"])
        assert n == len(ids) + body["usage"]["completion_tokens"]
        full = list(ids)
        for _ in range(n - len(ids)):  # greedy continuation, as the server's temperature 0
            full.append(int(reference(model, full)[-1].argmax()))
        ref = reference(model, full)
        assert [TokenText(tok)(t)[0] for t in full] == lp["tokens"]
        for j in range(1, n):
            assert abs(lp["token_logprobs"][j] - float(ref[j - 1, full[j]])) < TOL
        # greedy tokens are their position's most likely: lm-eval's is_greedy test holds for them
        assert all(lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values()) for j in range(len(ids), n))
        assert body["choices"][0]["text"].startswith(PROMPTS[1])


def test_completion_logprobs_without_echo_start_after_the_prompt(client, tok, model):
    ids = tok(PROMPTS[0])["input_ids"]
    body = client.post("/v1/completions", json={"model": BASE, "prompt": PROMPTS[0], "max_tokens": 3,
                                                "logprobs": 0, "temperature": 0}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["text_offset"][0] == len(PROMPTS[0])
    assert all(len(top) == 1 for top in lp["top_logprobs"])  # logprobs 0: the chosen token alone
    full = list(ids)
    for _ in range(3):
        full.append(int(reference(model, full)[-1].argmax()))
    ref = reference(model, full)
    assert lp["token_logprobs"] == pytest.approx([float(ref[len(ids) + j - 1, full[len(ids) + j]])
                                                  for j in range(3)], abs=TOL)


def test_completions_stream_carries_the_same_logprobs(client):
    body = {"model": BASE, "prompt": PROMPTS[1], "max_tokens": 6, "logprobs": 2, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    joined = {k: [x for part in parts for x in part[k]] for k in whole}
    assert joined == whole  # text_offset too: it runs on across chunks
    # with echo: the prompt (and its logprobs) in a first chunk, then the same as without streaming
    body.update(echo=True, prompt=[PROMPTS[1], PROMPTS[0]], logprobs=1)
    whole = client.post("/v1/completions", json=body).json()["choices"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for k, choice in enumerate(whole):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == k]
        assert "".join(c["text"] for c in mine) == choice["text"]
        parts = [c["logprobs"] for c in mine if c["logprobs"]]
        assert {key: [x for part in parts for x in part[key]] for key in choice["logprobs"]} == choice["logprobs"]
    body.pop("logprobs")
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == 1) == whole[1]["text"]


def test_chat_logprobs_equal_a_forward_and_the_openai_client_parses_them(app, tok, model):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                           http_client=TestClient(app))
    out = client.chat.completions.create(model=BASE, messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=4)
    content = out.choices[0].logprobs.content
    ids = prompt_ids(tok, MSGS)
    full = list(ids)
    for _ in content:
        full.append(int(reference(model, full)[-1].argmax()))
    ref = reference(model, full)
    text_of = TokenText(tok)
    assert len(content) == out.usage.completion_tokens
    for j, entry in enumerate(content):
        row, token = ref[len(ids) + j - 1], full[len(ids) + j]
        vals, idx = row.topk(4)
        assert abs(entry.logprob - float(row[token])) < TOL
        assert [t.token for t in entry.top_logprobs] == [text_of(i)[0] for i in idx.tolist()]
        assert max(abs(t.logprob - float(v)) for t, v in zip(entry.top_logprobs, vals)) < TOL
        assert entry.token == text_of(token)[0]
        for t, i in [(entry, token)] + list(zip(entry.top_logprobs, idx.tolist())):  # the real UTF-8 bytes
            assert bytes(t.bytes).decode("utf-8", "replace") == tok.decode([i])
            if t.token.startswith("bytes:"):  # part of a character: OpenAI's "bytes:\\xNN" and the byte itself
                assert bytes(t.bytes) == bytes.fromhex(t.token[6:].replace("\\x", "")) and t.bytes[0] >= 0x80
            else:
                assert bytes(t.bytes).decode() == t.token
    # streamed: the chunks' logprobs join to the same list
    stream = client.chat.completions.create(model=BASE, messages=MSGS, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=4, stream=True)
    streamed = [c for ch in stream for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    # and the legacy shape through the client
    comp = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=2)
    assert comp.choices[0].logprobs.token_logprobs[0] is None and len(comp.choices[0].logprobs.tokens) > 1
    plain = client.chat.completions.create(model=BASE, messages=MSGS, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_sampled_tokens_logprobs_are_of_the_raw_distribution(engine, tok, model):
    """At temperature 1.5 each sampled token's logprob is still log_softmax of the raw logits; the
    engine's Completion holds one entry per prompt token and per generated token."""
    ids = tok(PROMPTS[2])["input_ids"]
    done = engine.submit(GenRequest(ids, BASE, max_tokens=4, temperature=1.5, seed=3, logprobs=2,
                                    prompt_logprobs=True)).result()
    full = ids + done.token_ids
    ref = reference(model, full)
    entries = done.prompt_logprobs + done.logprobs
    assert [e.token for e in entries] == full and entries[0].logprob is None
    for j in range(1, len(full)):
        assert abs(entries[j].logprob - float(ref[j - 1, full[j]])) < TOL
        assert [t for t, _ in entries[j].top] == ref[j - 1].topk(2).indices.tolist()
    with pytest.raises(DataError, match="max_tokens"):
        engine.submit(GenRequest(ids, BASE, max_tokens=-1))
    with pytest.raises(DataError, match="logprobs"):
        engine.submit(GenRequest(ids, BASE, logprobs=21))


def test_echo_rows_prefill_apart_and_leave_other_rows_unchanged(tok, model):
    """Rows asking for prompt logprobs are prefilled apart from the others in one admission (all
    positions' logits only where needed); every row's reply is the one it gets alone."""
    from tunesmith.serve import logprobs as lp

    reqs = [GenRequest(tok(t)["input_ids"], BASE, max_tokens=5, logprobs=1 if i % 2 else None,
                       prompt_logprobs=bool(i % 2)) for i, t in enumerate(PROMPTS + ["Grace Mori"])]
    with Engine(model, tok, BASE, max_batch=8, batch_wait_ms=300) as eng:
        alone = [eng.submit(r).result() for r in reqs]
        handles = [eng.submit(r) for r in reqs]
        together = [h.result() for h in handles]
    assert [a.token_ids for a in alone] == [t.token_ids for t in together]
    for a, t in zip(alone, together):
        assert (a.prompt_logprobs is None) == (t.prompt_logprobs is None)
        if t.prompt_logprobs:
            assert [e.logprob for e in t.prompt_logprobs[1:]] == pytest.approx(
                [e.logprob for e in a.prompt_logprobs[1:]], abs=TOL)
    # the logits budget: rows x widest prompt x vocab x 8 bytes within LOGIT_BYTES, one row always allowed
    vocab = lp.LOGIT_BYTES // (8 * 100)  # room for 100 positions
    assert lp.prefill_parts([30, 30, 30, 50, 200, 10], vocab) == [[0, 1, 2], [3], [4], [5]]


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", ["20"]),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": -1}, "top_logprobs", ["0"]),
    ("/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": False, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": 3}, "logprobs", []),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs", ["5"]),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs", []),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ["echo"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", []),
])
def test_out_of_range_logprobs_fields_are_openai_400s(client, path, body, param, words):
    assert_error(client.post(path, json={"model": BASE, **body}), 400, param, words)


def test_echo_without_logprobs_and_null_logprobs_are_plain(client):
    body = client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2, "echo": True,
                                                "temperature": 0, "logprobs": None}).json()
    assert body["choices"][0]["text"].startswith("Hi") and body["choices"][0]["logprobs"] is None
    body = client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 0, "echo": True}).json()
    assert body["choices"][0]["text"] == "Hi" and body["usage"]["completion_tokens"] == 0


# ------------------------------------------------------------------ lm-eval local-completions

def test_lm_eval_local_completions_equal_tunesmith_eval(tmp_path, tok, model, monkeypatch):
    """lm-eval's `local-completions` (tokenized requests, echo, logprobs 1, max_tokens 1) against
    the server gives the per-choice log-likelihoods and the accuracies of `tunesmith eval`."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pip install 'lm-eval[api]')")
    import lm_eval

    from test_harness import small_arc
    from serve_fake import running
    from tunesmith.config import EvalTaskSection
    from tunesmith.eval import multiple_choice as mc
    from tunesmith.eval.harness import _example, _load_tasks, local_task_yaml
    from tunesmith.generation import InferenceModel

    data = small_arc(tmp_path / "colours.jsonl", n=6)
    tasks, manager = _load_tasks([str(local_task_yaml(data, tmp_path / "colours.yaml", task_name="colours_api"))])
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    with Engine(model, tok, BASE, max_batch=8) as engine:
        with running(build_app(engine, limits=Limits(context_length=engine.context))) as url:
            out = lm_eval.simple_evaluate(
                model="local-completions", tasks=tasks, task_manager=manager, log_samples=True,
                model_args=f"model={BASE},base_url={url}/v1/completions,tokenizer={tok_dir},"
                           "tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1,"
                           "batch_size=4")
    theirs = sorted((_example(s) for s in out["samples"]["colours_api"]), key=lambda r: r["id"])
    ours = mc.evaluate(InferenceModel(model, tok, "tiny"),
                       EvalTaskSection(name="colours", kind="multiple_choice", path=str(data), batch_size=3))
    assert len(theirs) == len(ours.examples) == 6
    for t, o in zip(theirs, ours.examples):
        assert t["loglikelihoods"] == pytest.approx(o["loglikelihoods"], abs=1e-4)
        assert (t["score"], t["score_norm"]) == (o["score"], o["score_norm"])
    assert len({r["prediction"] for r in ours.examples}) > 1  # not one constant answer
    res = out["results"]["colours_api"]
    assert res["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])


@pytest.mark.parametrize("family,lead,split", [("llama", "", False), ("qwen2", "", True), ("mistral", " ", True)])
def test_token_bytes_join_to_the_texts_utf8(family, lead, split):
    """Each token's `bytes` are its real UTF-8 bytes, parts of characters included (byte-level BPE
    alphabet, SentencePiece <0xNN> pieces), so a client can join them; SentencePiece tokens keep the
    space their word starts with (the first one too: the tokenizer adds it)."""
    from families import family_tokenizer

    tok = family_tokenizer(family)
    text = "Café naïve 😀 — ok, 東京"
    text_of = TokenText(tok)
    parts = [text_of(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    assert b"".join(bytes(raw) for _, raw in parts) == (lead + text).encode()
    # Qwen splits 東 and Mistral the emoji inside the character; Llama 3 has them whole
    assert any(s.startswith("bytes:") for s, _ in parts) == split
