"""LLM-as-judge: both orders cancel position bias, agreement is measured, the request is an
OpenAI chat completion. The endpoint is a local fake OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tunesmith import cli
from tunesmith.errors import TunesmithError
from tunesmith.eval import judge as J
from tunesmith.eval.results import TaskResult, write_result
from tunesmith.generation import InferenceModel

ANSWERS = re.compile(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWhich answer", re.S)


@contextmanager
def fake_endpoint(policy, status=200):
    """An OpenAI-compatible /v1/chat/completions whose reply text is policy(request body)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            payload = ({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": policy(body)}}]}
                       if status == 200 else {"error": {"message": "overloaded"}})
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def always_a(body):
    return "A"


def prefers_longer(body):
    a, b = ANSWERS.search(body["messages"][-1]["content"]).groups()
    return "[[A]]" if len(a) > len(b) else "[[B]]"


QUESTIONS = ["What is 2+2?", "Name a colour.", "Capital of France?", "Say hi."]
SHORT = ["4", "red", "Paris is the capital of France.", "hi"]
LONG = ["2 + 2 equals 4.", "A colour: blue.", "Paris.", "Hello there, nice to meet you!"]


def test_position_biased_judge_agrees_never_and_gives_only_ties():
    with fake_endpoint(always_a) as (url, seen):
        rep = J.judge_pairs(J.EndpointJudge(url, "judge-1", retries=0), QUESTIONS, SHORT, LONG)
    assert len(seen) == 2 * len(QUESTIONS)                  # every pair asked in both orders
    assert rep.agreement == 0.0 and rep.ties == rep.n == 4 and rep.wins_a == rep.wins_b == 0
    assert rep.tie_rate == 1.0 and rep.undecided == 0
    assert all(p["a_first"] == "A" and p["b_first"] == "A" and p["winner"] == "tie" for p in rep.pairs)


def test_consistent_judge_agrees_always_and_counts_wins():
    with fake_endpoint(prefers_longer) as (url, _):
        rep = J.judge_pairs(J.EndpointJudge(url, "judge-1", retries=0), QUESTIONS, SHORT, LONG, ids=[7, 8, 9, 10])
    expected_b = sum(len(b) > len(a) for a, b in zip(SHORT, LONG))
    assert rep.agreement == 1.0 and rep.ties == 0
    assert (rep.wins_a, rep.wins_b) == (len(QUESTIONS) - expected_b, expected_b) == (1, 3)
    assert rep.win_rate_b == pytest.approx(expected_b / 4)
    assert [p["winner"] for p in rep.pairs] == ["b", "b", "a", "b"] and rep.pairs[2]["id"] == 9


def test_request_body_and_api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with fake_endpoint(always_a) as (url, seen):
        J.judge_pairs(J.EndpointJudge(url, "judge-7b", api_key_env="JUDGE_KEY", retries=0), ["Q?"], ["first"],
                      ["second"])
        monkeypatch.delenv("JUDGE_KEY")
        J.EndpointJudge(url + "/", "judge-7b", api_key_env="JUDGE_KEY", retries=0)(J.judge_messages("q", "x", "y"))
    body = seen[0]["body"]
    assert seen[0]["path"] == "/v1/chat/completions" and body["model"] == "judge-7b"
    assert body["temperature"] == 0 and [m["role"] for m in body["messages"]] == ["system", "user"]
    a, b = ANSWERS.search(body["messages"][1]["content"]).groups()
    assert (a, b) == ("first", "second") and "Q?" in body["messages"][1]["content"]
    a2, b2 = ANSWERS.search(seen[1]["body"]["messages"][1]["content"]).groups()
    assert (a2, b2) == ("second", "first")                  # the swapped order
    assert seen[0]["auth"] == "Bearer sk-test" and seen[2]["auth"] in (None, "Bearer none")


def test_endpoint_errors_are_clear():
    with fake_endpoint(always_a, status=400) as (url, _):
        with pytest.raises(TunesmithError, match=r"judge endpoint .*400"):
            J.EndpointJudge(url, "m", api_key_env="NO_SUCH_KEY_VAR", retries=0)(J.judge_messages("q", "a", "b"))
    with pytest.raises(TunesmithError, match="http"):
        J.EndpointJudge("localhost:8000", "m")


@pytest.mark.parametrize("text,verdict", [("A", "A"), (" b.", None), ("B.", "B"), ("[[B]]", "B"),
                                          ("The answer is A.", "A"), ("Verdict: B", "B"), ("A is better", "A"),
                                          ("Neither", None), ("", None), ("Both are fine", None)])
def test_parse_verdict(text, verdict):
    assert J.parse_verdict(text) == verdict


def test_local_logprob_judge_matches_the_model_loss(tiny_tokenizer):
    from conftest import tiny_llama
    from tunesmith.data.tokenize import prompt_ids

    im = InferenceModel(tiny_llama(len(tiny_tokenizer), seed=3).eval(), tiny_tokenizer, "tiny")
    local = J.LocalJudge(im)
    msgs = J.judge_messages("Capital of France?", "Paris", "Lyon")
    scores = local.scores(msgs)
    prompt = prompt_ids(tiny_tokenizer, msgs)
    for letter, s in scores.items():
        cand = tiny_tokenizer(letter, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cand])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt):] = ids[0, len(prompt):]
        with torch.no_grad():
            loss = im.model(input_ids=ids, labels=labels).loss  # transformers' own mean NLL of the answer
        assert s == pytest.approx(-float(loss) * len(cand), abs=1e-4)
    assert local(msgs) == max(scores, key=scores.get)


def test_judge_command_reads_two_result_files(tmp_path):
    def res(model, preds):
        rows = [{"id": i, "input": [{"role": "user", "content": q}], "reference": "", "prediction": p}
                for i, (q, p) in enumerate(zip(QUESTIONS, preds))]
        return TaskResult(task="qa", kind="generation", model=model, metrics={}, primary="exact_match",
                          n=len(rows), examples=rows)

    a = write_result(tmp_path / "base", res("base", SHORT))
    b = write_result(tmp_path / "tuned", res("tuned", LONG))
    with fake_endpoint(prefers_longer) as (url, seen):
        rc = cli.main(["judge", str(a), str(b), "--endpoint", url, "--judge-model", "j", "--limit", "3",
                       "--out", str(tmp_path / "j.json")])
    assert rc == 0 and len(seen) == 6
    assert "user: What is 2+2?" in seen[0]["body"]["messages"][1]["content"]
    out = json.loads((tmp_path / "j.json").read_text())
    assert (out["n"], out["wins_b"], out["wins_a"], out["agreement"]) == (3, 2, 1, 1.0)
    assert cli.main(["judge", str(a), str(b)]) == 2                       # no judge given
