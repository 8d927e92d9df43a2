"""Pairwise LLM-as-judge: which of two replies to the same prompt is better.

Judges prefer whichever answer they see first (or second) more often than chance, so every pair
is asked twice, A/B and B/A. A pair counts as a win only when both orders pick the same reply;
otherwise it is a tie. The agreement rate (share of pairs where both orders agree) says how much
the verdicts can be trusted: a judge that always answers "A" agrees 0% of the time.

A judge is any callable `messages -> "A" | "B" | None`: a local InferenceModel (verdict from the
log-likelihood of the answers "A" and "B", or from generated text) or an OpenAI-compatible
endpoint (the `openai` package when installed, else plain urllib).
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from tunesmith.errors import ConfigError, TunesmithError

SYSTEM = ("You are an impartial judge of answers written by AI assistants. Judge helpfulness, correctness and "
          "following the instructions; ignore the order in which the answers are shown and their length.")
TEMPLATE = ("[Question]\n{question}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
            "Which answer is better? Reply with a single letter: A or B.")


def judge_messages(question: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(question=question, first=first, second=second)}]


def parse_verdict(text: str | None) -> str | None:
    """"A"/"B" from a judge's reply ("A", "[[B]]", "Answer: A.", "B is better"); None if it names neither."""
    if not text:
        return None
    t = text.strip()
    m = (re.fullmatch(r"\W*([AB])\W*", t) or re.search(r"\[\[([AB])\]\]", t)
         or re.search(r"(?i:answer|verdict|winner)\W*(?:is\W*)?([AB])\b", t) or re.match(r"\W*([AB])\b", t))
    return m.group(1) if m else None


# ---- judges ---------------------------------------------------------------------------------------

class EndpointJudge:
    """An OpenAI-compatible chat endpoint; base_url as the openai client takes it (…/v1)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_tokens: int = 8, retries: int = 2):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge endpoint '{base_url}' must be an http(s) URL such as http://localhost:8000/v1")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout, self.max_tokens, self.retries = timeout, max_tokens, retries

    def __call__(self, messages: list[dict]) -> str | None:
        return parse_verdict(self.complete(messages))

    def complete(self, messages: list[dict]) -> str:
        """The reply text; the one place the OpenAI HTTP API is spoken."""
        key = os.environ.get(self.api_key_env)
        try:
            import openai
        except ImportError:
            return self._urllib(messages, key)
        client = openai.OpenAI(base_url=self.base_url, api_key=key or "none", timeout=self.timeout,
                               max_retries=self.retries)
        try:
            reply = client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                   max_tokens=self.max_tokens)
        except openai.OpenAIError as exc:
            raise TunesmithError(self._hint(f"judge endpoint {self.base_url} failed: {exc}", key)) from None
        return reply.choices[0].message.content or ""

    def _hint(self, msg: str, key: str | None) -> str:
        return msg if key else f"{msg} (no API key sent: set ${self.api_key_env} if the endpoint needs one)"

    def _urllib(self, messages: list[dict], key: str | None) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                retry = exc.code == 429 or exc.code >= 500
                error = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                retry, error = True, f"cannot reach it ({getattr(exc, 'reason', exc)})"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                raise TunesmithError(f"judge endpoint {url} answered without choices[0].message.content "
                                     f"({exc!r}); is it OpenAI-compatible?") from None
            if not retry or attempt == self.retries:
                break
            time.sleep(0.5 * 2 ** attempt)  # rate limits and restarts usually pass within seconds
        raise TunesmithError(self._hint(f"judge endpoint {url}: {error}", key))


class LocalJudge:
    """A local InferenceModel. mode "logprob": the verdict is whichever of "A" and "B" the model
    finds likelier as its reply (no parsing, never undecided unless exactly equal);
    mode "generate": the model writes a reply that is parsed like an endpoint's."""

    def __init__(self, im, mode: str = "logprob", max_new_tokens: int = 8):
        if mode not in ("logprob", "generate"):
            raise ConfigError(f"local judge mode '{mode}': use logprob or generate")
        self.im, self.mode, self.max_new_tokens = im, mode, max_new_tokens

    def scores(self, messages: list[dict]) -> dict[str, float]:
        """Log-likelihood of each answer letter as the whole assistant reply's start."""
        import torch

        from tunesmith.data.tokenize import prompt_ids

        tok, model = self.im.tokenizer, self.im.model
        prompt = prompt_ids(tok, messages)
        out = {}
        with torch.no_grad():
            for letter in ("A", "B"):
                cand = tok(letter, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + cand])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), dim=-1)
                out[letter] = float(logp[torch.arange(len(cand)), torch.tensor(cand)].sum())
        return out

    def __call__(self, messages: list[dict]) -> str | None:
        if self.mode == "generate":
            from tunesmith.generation import generate

            return parse_verdict(generate(self.im, [messages], self.max_new_tokens)[0])
        s = self.scores(messages)
        return None if s["A"] == s["B"] else max(s, key=s.get)


# ---- both orders, aggregated ---------------------------------------------------------------------

@dataclass
class JudgeReport:
    n: int
    wins_a: int
    wins_b: int
    ties: int
    agreement: float            # share of pairs where both orders picked the same reply
    win_rate_a: float
    win_rate_b: float
    tie_rate: float
    undecided: int              # single verdicts that named neither A nor B
    pairs: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def judge_pairs(judge, questions: list[str], replies_a: list[str], replies_b: list[str],
                ids: list | None = None) -> JudgeReport:
    """Ask `judge` about every (question, a, b) in both orders; a win needs both orders to agree."""
    if not (len(questions) == len(replies_a) == len(replies_b)):
        raise TunesmithError(f"judge: {len(questions)} prompts but {len(replies_a)} and {len(replies_b)} replies")
    pairs, undecided = [], 0
    for i, (q, a, b) in enumerate(zip(questions, replies_a, replies_b)):
        first = judge(judge_messages(q, a, b))      # a shown as A
        second = judge(judge_messages(q, b, a))     # b shown as A
        undecided += (first is None) + (second is None)
        pick_1 = {"A": "a", "B": "b"}.get(first)
        pick_2 = {"A": "b", "B": "a"}.get(second)
        agree = pick_1 is not None and pick_1 == pick_2
        pairs.append({"id": ids[i] if ids else i, "a_first": first, "b_first": second,
                      "winner": pick_1 if agree else "tie", "agree": agree})
    n = len(pairs)
    wins_a = sum(p["winner"] == "a" for p in pairs)
    wins_b = sum(p["winner"] == "b" for p in pairs)
    rate = (lambda k: k / n if n else 0.0)
    return JudgeReport(n, wins_a, wins_b, n - wins_a - wins_b, rate(sum(p["agree"] for p in pairs)),
                       rate(wins_a), rate(wins_b), rate(n - wins_a - wins_b), undecided, pairs)


def _as_text(value) -> str:
    """A prompt as the judge reads it: a message list becomes `role: content` lines."""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def pair_results(base, tuned) -> tuple[list, list[str], list[str], list[str]]:
    """(ids, prompts, base replies, tuned replies) from two TaskResults' rows paired by id."""
    t = {str(r.get("id", i)): r for i, r in enumerate(tuned.examples)}
    rows = [(rb, t[str(rb.get("id", i))]) for i, rb in enumerate(base.examples) if str(rb.get("id", i)) in t]
    rows = [(rb, rt) for rb, rt in rows if rb.get("prediction") is not None and rt.get("prediction") is not None]
    if not rows:
        raise TunesmithError(f"judge: no example of '{base.task}' has a prediction in both results "
                             "(judge generation tasks)")
    return ([rb.get("id") for rb, _ in rows], [_as_text(rb.get("input")) for rb, _ in rows],
            [str(rb["prediction"]) for rb, _ in rows], [str(rt["prediction"]) for _, rt in rows])


def run_judge(results: list[str], endpoint: str | None = None, judge_model: str | None = None,
              local: str | None = None, mode: str = "logprob", api_key_env: str = "OPENAI_API_KEY",
              limit: int | None = None, out: str | None = None) -> int:
    """`tunesmith judge BASE.json TUNED.json`: the two result files of one generation task (as
    `tunesmith eval`/`compare` write them), judged pairwise; a = base (first file), b = tuned."""
    from pathlib import Path

    from tunesmith.atomic import write_json
    from tunesmith.eval.results import read_result

    if len(results) != 2:
        raise ConfigError("judge takes two result files: BASE.json TUNED.json (e.g. from compare's base/ and tuned/)")
    if bool(endpoint) == bool(local):
        raise ConfigError("judge: give either --endpoint URL --judge-model NAME or --local MODEL")
    if endpoint and not judge_model:
        raise ConfigError("judge: --endpoint needs --judge-model NAME (the model name the endpoint serves)")
    loaded = []
    for p in results:
        try:
            loaded.append(read_result(Path(p)))
        except (OSError, ValueError, TypeError) as exc:
            raise TunesmithError(f"judge: cannot read result file {p}: {exc}") from None
    ids, prompts, a, b = pair_results(*loaded)
    if limit:
        ids, prompts, a, b = ids[:limit], prompts[:limit], a[:limit], b[:limit]
    if endpoint:
        judge = EndpointJudge(endpoint, judge_model, api_key_env)
    else:
        from tunesmith.generation import load_for_inference

        judge = LocalJudge(load_for_inference(local), mode)
    report = judge_pairs(judge, prompts, a, b, ids)
    print(f"judged {report.n} pairs of '{loaded[0].task}' in both orders: base wins {report.win_rate_a:.1%}, "
          f"tuned wins {report.win_rate_b:.1%}, ties {report.tie_rate:.1%}; orders agree on {report.agreement:.1%}"
          + (f"; {report.undecided} verdicts named neither answer" if report.undecided else ""))
    if out:
        write_json(out, {"base": loaded[0].model, "tuned": loaded[1].model, "task": loaded[0].task,
                         **report.to_json()})
        print(f"saved {out}")
    return 0
