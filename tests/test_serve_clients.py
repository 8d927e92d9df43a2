"""`tunesmith serve` end to end: the real engine on a tiny random Llama with LoRA adapters from
run directories (each with its own chat template), a real uvicorn on loopback, and real
clients: the official `openai` package and lm-eval's `local-chat-completions` model. Replies are
checked against transformers' own generate on the same adapter and template; a bounded load test
of mixed valid and invalid requests must see no 5xx; `serve()` itself runs in a subprocess."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import CHATML, ROOT, build_tokenizer, tiny_llama, write_jsonl
from serve_fake import free_port, running
from tunesmith.data.tokenize import prompt_ids

KEY = "test-key-123"
BASE = "tiny"
ALT = ("{% for m in messages %}{{'### ' + m['role'] + ': ' + m['content'] + '\n'}}{% endfor %}"
       "{% if add_generation_prompt %}{{'### assistant:'}}{% endif %}")
BRACKETS = ("{% for m in messages %}{{'[' + m['role'] | upper + '] ' + m['content'] + ' [END]\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{'[ASSISTANT]'}}{% endif %}")
MSGS = [{"role": "user", "content": "Deliver to Lyon, attention Grace Mori: 3 scarves"}]


def write_lora(vocab: int, path: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero A and B (a fresh one changes nothing), in PEFT format."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(vocab), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    model.save_pretrained(path)
    return path


def write_run(root: Path, name: str, template: str, seed: int, vocab: int) -> Path:
    """The parts of a tunesmith run directory serving reads: manifest, adapter/, tokenizer/."""
    run = root / name
    write_lora(vocab, run / "adapter", seed)
    build_tokenizer(template).save_pretrained(run / "tokenizer")
    (run / "manifest.json").write_text(json.dumps({"model": {"id": BASE, "path": ""}}))
    return run


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CHATML)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("adapters")
    write_run(root, "run-alt", ALT, seed=1, vocab=len(tok))
    write_run(root, "run-brackets", BRACKETS, seed=2, vocab=len(tok))
    write_lora(len(tok), root / "plain", seed=3)  # a bare PEFT adapter: the base's tokenizer and template
    return root


@pytest.fixture(scope="module")
def server(tok, adapters):
    """The real engine and app, with an API key, on loopback."""
    from tunesmith.serve.app import build_app
    from tunesmith.serve.checks import Limits
    from tunesmith.serve.engine import Engine

    with Engine(tiny_llama(len(tok)), tok, BASE, adapters_dir=adapters, max_batch=8) as engine:
        limits = Limits(max_tokens_limit=64, max_prompt_tokens=300, context_length=engine.context)
        with running(build_app(engine, api_key=KEY, limits=limits)) as url:
            yield {"url": url, "engine": engine}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def model_and_tokenizer(name: str, tok, adapters: Path):
    """An independent copy of what `name` should be: the base (same seed, same weights) with the
    adapter attached by PEFT, and the tokenizer whose template requests must be rendered with."""
    from peft import PeftModel

    base = tiny_llama(len(tok)).eval()
    if name == BASE:
        return base, tok
    folder = adapters / name
    if (folder / "adapter").is_dir():
        return PeftModel.from_pretrained(base, str(folder / "adapter")).eval(), build_tokenizer(
            ALT if name == "run-alt" else BRACKETS)
    return PeftModel.from_pretrained(base, str(folder)).eval(), tok


@torch.no_grad()
def hf_greedy(model, tok, ids: list[int], max_new: int) -> tuple[str, int]:
    """transformers' greedy generate: (text, tokens generated) — the reference for the server."""
    t = torch.tensor([ids])
    out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=max_new, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=tok.eos_token_id, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(new)


# -------------------------------------------------------------------------- openai client

def test_openai_client_lists_models(client):
    assert [m.id for m in client.models.list().data] == [BASE, "plain", "run-alt", "run-brackets"]
    assert client.models.retrieve("run-alt").id == "run-alt"


@pytest.mark.parametrize("model", [BASE, "plain", "run-alt", "run-brackets"])
def test_chat_equals_transformers_generate_with_that_models_template(client, tok, adapters, model):
    ref_model, ref_tok = model_and_tokenizer(model, tok, adapters)
    ids = prompt_ids(ref_tok, MSGS)
    want, n_new = hf_greedy(ref_model, ref_tok, ids, 12)
    out = client.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == n_new
    assert out.choices[0].finish_reason == ("length" if n_new == 12 else "stop")


def test_each_run_keeps_its_own_template(client):
    counts = {m: client.chat.completions.create(model=m, messages=MSGS, max_tokens=1).usage.prompt_tokens
              for m in (BASE, "run-alt", "run-brackets")}
    assert len(set(counts.values())) == 3, counts  # three templates, three different prompts


def test_stream_joins_to_the_non_stream_reply(client):
    for model in ("run-alt", BASE):
        whole = client.chat.completions.create(model=model, messages=MSGS, max_tokens=20, temperature=0)
        stream = client.chat.completions.create(model=model, messages=MSGS, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
        assert chunks[0].choices[0].delta.role == "assistant"


def test_sampling_n_seed_and_stop(client):
    kw = dict(model="plain", messages=MSGS, max_tokens=10, temperature=1.0, n=3, seed=7)
    a = [c.message.content for c in client.chat.completions.create(**kw).choices]
    b = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1  # seeded: reproducible; seeds offset per choice: different
    greedy = client.chat.completions.create(model="plain", messages=MSGS, max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model="plain", messages=MSGS, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_completions_equal_transformers_generate(client, tok):
    prompt = "Hello there. What is"
    want, _ = hf_greedy(tiny_llama(len(tok)).eval(), tok, tok(prompt)["input_ids"], 8)
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == want
    chunks = list(client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_openai_client_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="run-alt"):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=BASE, messages=MSGS, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=BASE, messages=MSGS, logprobs=True, top_logprobs=21)


def test_adapters_unload_and_load_by_name(server, client):
    engine = server["engine"]
    before = client.chat.completions.create(model="run-brackets", messages=MSGS, max_tokens=6, temperature=0)
    assert "run-brackets" in engine.loaded()  # loaded lazily by the first request
    r = httpx.post(f"{server['url']}/v1/adapters/run-brackets/unload", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "run-brackets" not in engine.loaded()
    listed = httpx.get(f"{server['url']}/v1/adapters", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert {a["id"]: a["loaded"] for a in listed}["run-brackets"] is False
    r = httpx.post(f"{server['url']}/v1/adapters/run-brackets/load", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "run-brackets" in engine.loaded()
    after = client.chat.completions.create(model="run-brackets", messages=MSGS, max_tokens=6, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content


# ----------------------------------------------------------------------------- lm-eval

QUESTIONS = ["Deliver to Lyon", "What is the capital of France?", "Grace Mori"]


def _generation_task(tmp_path: Path, answers: list[str]) -> Path:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)])
    task = {"task": "serve_qa", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    path = tmp_path / "serve_qa.yaml"
    path.write_text(json.dumps(task))  # JSON is YAML
    return path


def test_lm_eval_local_chat_completions_against_the_server(server, client, tmp_path, monkeypatch):
    """lm-eval's own API model drives the server; what it records is what the server answers for
    the same messages, and its exact_match counts the one target set to the server's reply."""
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pip install 'lm-eval[api]')")
    import lm_eval

    from tunesmith.eval.harness import _load_tasks

    def ask(messages):
        return client.chat.completions.create(model="run-alt", messages=messages, max_tokens=8, temperature=0,
                                              stop=["\n\n"]).choices[0].message.content
    right = ask([{"role": "user", "content": QUESTIONS[1]}])
    assert right.strip()  # a reply that could be told apart from the two wrong targets
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval sends it as the bearer token
    tasks, manager = _load_tasks([str(_generation_task(tmp_path, ["x", right, "y"]))])
    out = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=tasks, task_manager=manager, apply_chat_template=True,
        model_args=f"model=run-alt,base_url={server['url']}/v1/chat/completions,num_concurrent=1,max_retries=1,"
                   "tokenized_requests=False", log_samples=True)
    samples = sorted(out["samples"]["serve_qa"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    for s in samples:
        context = s["arguments"][0][0]  # lm-eval's JsonChatStr: the chat messages as a JSON string
        messages = json.loads(context[0] if isinstance(context, (tuple, list)) else context)
        assert messages[-1]["content"] == s["doc"]["question"]
        assert s["resps"][0][0] == ask(messages)  # what lm-eval recorded is what the server answers
    assert [s["exact_match"] for s in samples] == [0.0, 1.0, 0.0]
    assert out["results"]["serve_qa"]["exact_match,none"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- load test

def test_bounded_load_test_has_no_5xx(server):
    """16 clients for 3 s on loopback, each sending a mix of valid (chat, streamed chat,
    completions, other adapters) and invalid requests (bad JSON, unknown model, wrong key,
    over-limit max_tokens): every answer is < 500 and every valid request succeeds."""
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}"}
    kinds = [
        ("ok", "/v1/chat/completions", {"model": BASE, "messages": MSGS, "max_tokens": 6}, auth),
        ("ok", "/v1/chat/completions", {"model": "run-alt", "messages": MSGS, "max_tokens": 4, "stream": True}, auth),
        ("ok", "/v1/completions", {"model": "plain", "prompt": "Hi", "max_tokens": 5, "n": 2}, auth),
        ("ok", "/v1/chat/completions", {"model": "run-brackets", "messages": MSGS, "max_tokens": 3,
                                        "temperature": 0.8, "seed": 1}, auth),
        ("bad", "/v1/chat/completions", b"{oops", auth),
        ("bad", "/v1/chat/completions", {"model": "nope", "messages": MSGS}, auth),
        ("bad", "/v1/chat/completions", {"model": BASE, "messages": MSGS}, {"Authorization": "Bearer wrong"}),
        ("bad", "/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 10 ** 9}, auth),
    ]
    statuses: dict[int, int] = {}
    failures: list = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 3.0

    def worker(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < stop_at:
                kind, path, body, headers = rng.choice(kinds)
                if isinstance(body, bytes):
                    r = c.post(path, content=body, headers={**headers, "content-type": "application/json"})
                else:
                    r = c.post(path, json=body, headers=headers)
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 500 or (kind == "ok") != (r.status_code == 200):
                        failures.append((path, body, r.status_code, r.text[:200]))
                    elif kind == "ok" and body.get("stream") and not r.text.rstrip().endswith("data: [DONE]"):
                        failures.append((path, body, "unfinished stream", r.text[-200:]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print("load test statuses:", statuses)
    assert not failures, failures[:5]
    assert not any(s >= 500 for s in statuses) and statuses.get(200, 0) >= 16, statuses
    assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200


# ----------------------------------------------------------------------------- serve()

def test_serve_runs_a_run_directory_with_key_from_the_environment(tiny_model_dir, tmp_path):
    """serve() on a run directory: its base is served plain under the base's name and the run as
    an adapter under the run's name (with the run's template); the key comes from the environment;
    the model's context length is enforced."""
    run = tmp_path / "my-run"
    write_lora(len(build_tokenizer()), run / "adapter", seed=5)
    build_tokenizer(ALT).save_pretrained(run / "tokenizer")
    (run / "manifest.json").write_text(json.dumps({"model": {"id": str(tiny_model_dir), "path": str(tiny_model_dir)}}))
    (run / "config.yaml").write_text("method: {name: lora, r: 4}\n")
    port = free_port()
    code = (f"from tunesmith.serve.app import serve; serve({str(run)!r}, port={port}, max_tokens_limit=600)")
    env = {**os.environ, "TUNESMITH_API_KEY": KEY, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            try:
                models = [m.id for m in c.models.list().data]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert models == [tiny_model_dir.name, "my-run"]
        out = c.chat.completions.create(model="my-run", messages=MSGS, max_tokens=4)
        assert out.usage.prompt_tokens == len(prompt_ids(build_tokenizer(ALT), MSGS))
        with pytest.raises(openai.BadRequestError, match="context length is 512"):
            c.chat.completions.create(model="my-run", messages=MSGS, max_tokens=600)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_embedded_model_over_http_equals_generate(embedded_model):
    """The real SmolLM2 with its own chat template behind the server: the openai client's reply
    (whole and streamed) is what tunesmith's batched transformers generate gives."""
    from tunesmith.generation import InferenceModel, generate
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.serve.app import build_app
    from tunesmith.serve.engine import Engine

    tok = load_tokenizer(embedded_model.path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = generate(InferenceModel(load_model(embedded_model.path).eval(), tok, "ref"), [chat], max_new_tokens=24)[0]
    with Engine(load_model(embedded_model.path), tok, "smol") as engine, running(build_app(engine)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = c.chat.completions.create(model="smol", messages=chat, max_tokens=24, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smol", messages=chat, max_tokens=24, temperature=0, stream=True))
    assert out.choices[0].message.content.strip() == want and streamed == out.choices[0].message.content
    assert "Paris" in want and out.usage.prompt_tokens == len(prompt_ids(tok, chat))
