"""Does the exported model still behave like the trained one? Greedy outputs and logits of the
adapter on its base (the reference: what training produced) against the merged HF model and
each GGUF run by llama.cpp.

Every backend is fed the very same token ids: each prompt rendered once with the run's chat
template and tokenised by the run's tokenizer. So a difference is the weights' or the runtime's,
never a re-rendering. (Whether llama.cpp's own tokeniser turns the rendered text into those ids
is reported separately, as `tokenize_match`: that is what a server fed text will do.)

Per backend: `identical` — greedy continuations, token for token, equal to the reference's;
`max_logit_diff` — the largest |logit difference| against the reference over every position of
the reference continuation, computed teacher-forced (each backend scores the reference's own
tokens, so positions line up even after outputs diverge); `argmax_agreement` — the share of
those positions where the backend's top token is the reference's; `divergences` — for each
prompt whose output differs, the first differing position and the reference's top-2 logit margin
there (a margin below twice the logit error there is a near-tie that rounding can flip).
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import ModelError

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers greater than ten."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": 'Extract the name and city as JSON: "Maria lives in Lisbon."'}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain what a CPU does in one sentence."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Give me a synonym for happy."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
]


class _HF:
    """A transformers causal LM (PEFT-wrapped or not) as a greedy decoder and a scorer."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        tokens: list[int] = []
        for _ in range(max_new):
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            if tok in stop:
                break
            out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens

    @torch.no_grad()
    def scores(self, prompt: list[int], cont: list[int]) -> np.ndarray:
        """Logits predicting each token of `cont` (teacher-forced), [len(cont), vocab]."""
        ids = torch.tensor([prompt + cont[:-1]])
        return self.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:].float().numpy()

    def close(self) -> None:
        self.model = None


class _LlamaCpp:
    """A GGUF file in llama.cpp (llama-cpp-python), driven token by token so greedy is exact argmax."""

    def __init__(self, path: Path, n_ctx: int):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError(f"the GGUF parity check needs llama-cpp-python (pip install llama-cpp-python): {exc}")
        # One thread: results do not depend on the machine's core count, and other work keeps its cores.
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True,
                         verbose=False)

    def greedy(self, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        tokens: list[int] = []
        for _ in range(max_new):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            tokens.append(tok)
            if tok in stop:
                break
            self.llm.eval([tok])
        return tokens

    def scores(self, prompt: list[int], cont: list[int]) -> np.ndarray:
        self.llm.reset()
        seq = prompt + cont[:-1]
        self.llm.eval(seq)
        return np.array(self.llm.scores[len(prompt) - 1:len(seq)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


def _divergence(i: int, tokens: list[int], r: dict, scores: np.ndarray) -> dict:
    """Where a greedy output first leaves the reference's, and how close a call it was there: the
    reference's margin between its top two logits (a flip needs an error of at least half of it)."""
    k = next((j for j, (a, b) in enumerate(zip(tokens, r["tokens"])) if a != b), min(len(tokens), len(r["tokens"])))
    k = min(k, len(r["tokens"]) - 1)
    top2 = np.sort(r["scores"][k])[-2:]
    return {"prompt": i, "position": k, "reference_margin": float(top2[1] - top2[0]),
            "logit_diff_there": float(np.abs(scores[k] - r["scores"][k]).max())}


def _compare(backend, prompts: list[list[int]], ref: list[dict], max_new: int, stop: set[int]) -> dict:
    identical, diffs, agree, total, outputs, divergences = 0, [], 0, 0, [], []
    for i, (prompt, r) in enumerate(zip(prompts, ref)):
        tokens = backend.greedy(prompt, max_new, stop)
        outputs.append(tokens)
        scores = backend.scores(prompt, r["tokens"])
        if tokens == r["tokens"]:
            identical += 1
        else:
            divergences.append(_divergence(i, tokens, r, scores))
        diffs.append(float(np.abs(scores - r["scores"]).max()))
        agree += int((scores.argmax(-1) == r["scores"].argmax(-1)).sum())
        total += len(r["tokens"])
    return {"identical": identical, "rate": identical / len(prompts), "max_logit_diff": max(diffs),
            "max_logit_diff_per_prompt": diffs, "argmax_agreement": agree / total, "divergences": divergences,
            "outputs": outputs}


@contextmanager
def _merged(run: Path, merged_dir: Path | None):
    if merged_dir is not None:
        yield Path(merged_dir)
        return
    from tunesmith.export.merge import merge_run

    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-parity-"))
    try:
        yield merge_run(run, tmp, "float32")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reference(run: Path, prompts: list[list[int]], max_new: int, stop: set[int]):
    from tunesmith.generation import load_for_inference

    ref = _HF(load_for_inference(run).model)
    rows = []
    for p in prompts:
        tokens = ref.greedy(p, max_new, stop)
        rows.append({"tokens": tokens, "scores": ref.scores(p, tokens)})
    return rows


def parity(run_dir: str | Path, formats: tuple[str, ...] = ("f16", "q8_0", "q4_0"),
           prompts: list[list[dict]] | None = None, max_new_tokens: int = 32,
           merged_dir: Path | None = None, gguf_files: dict[str, Path] | None = None) -> dict:
    """Compare the run's adapter-on-base (reference) with its merged HF model and with each GGUF
    type in `formats` run by llama.cpp. `merged_dir` / `gguf_files` reuse exports already written;
    missing ones are written to a temporary folder. Returns the report described in the module doc."""
    from tunesmith.data.templates import stop_tokens
    from tunesmith.data.tokenize import prompt_ids, render
    from tunesmith.export.gguf import write_gguf
    from tunesmith.models.load import load_model, load_tokenizer

    run = Path(run_dir)
    conversations = prompts or PROMPTS
    report: dict = {"run": str(run), "prompts": len(conversations), "max_new_tokens": max_new_tokens,
                    "reference": ("the run's own weights" if (run / "model").is_dir() else
                                  "adapter on base (PEFT)") + ", float32, transformers", "backends": {}}
    tok = load_tokenizer(run / "tokenizer")
    texts = [render(tok, c, add_generation_prompt=True) for c in conversations]
    ids = [prompt_ids(tok, c) for c in conversations]
    stop = set(stop_tokens(tok).ids)  # where the trained model ends a reply (data/templates.py)
    ref = _reference(run, ids, max_new_tokens, stop)
    report["reference_outputs"] = [r["tokens"] for r in ref]
    report["reference_texts"] = [tok.decode(r["tokens"], skip_special_tokens=True) for r in ref]
    n_ctx = max(len(p) for p in ids) + max_new_tokens + 8
    with _merged(run, merged_dir) as merged, tempfile.TemporaryDirectory(prefix="tunesmith-gguf-") as tmp:
        backend = _HF(load_model(merged))
        report["backends"]["merged"] = _compare(backend, ids, ref, max_new_tokens, stop)
        backend.close()
        for fmt in formats:
            path = (gguf_files or {}).get(fmt) or write_gguf(merged, Path(tmp) / f"{run.name}-{fmt}.gguf", fmt)
            report["backends"][f"gguf-{fmt}"] = _gguf_row(path, tok, texts, ids, ref, max_new_tokens, stop, n_ctx)
    return report


def _gguf_row(path: Path, tok, texts: list[str], ids: list[list[int]], ref: list[dict], max_new: int,
              stop: set[int], n_ctx: int) -> dict:
    backend = _LlamaCpp(path, n_ctx)
    try:
        row = _compare(backend, ids, ref, max_new, stop)
        row["tokenize_match"] = sum(backend.tokenize(t) == i for t, i in zip(texts, ids)) / len(ids)
        row["texts"] = [tok.decode(t, skip_special_tokens=True) for t in row["outputs"]]
    finally:
        backend.close()
    return row


def model_parity(model_dir: str | Path, gguf_files: dict[str, Path], prompts: list[list[dict]] | None = None,
                 max_new_tokens: int = 16) -> dict:
    """Compare an HF model directory (the reference: float32, transformers) with GGUF files of it run
    by llama.cpp, e.g. the exports of one family's model. Same report as parity(), keyed
    'gguf-<name>' for each entry of `gguf_files`."""
    from tunesmith.data.templates import stop_tokens
    from tunesmith.data.tokenize import prompt_ids, render
    from tunesmith.models.load import load_model, load_tokenizer

    model_dir = Path(model_dir)
    conversations = prompts or PROMPTS
    tok = load_tokenizer(model_dir)
    texts = [render(tok, c, add_generation_prompt=True) for c in conversations]
    ids = [prompt_ids(tok, c) for c in conversations]
    stop = set(stop_tokens(tok).ids)
    reference = _HF(load_model(model_dir))
    ref = [{"tokens": (t := reference.greedy(p, max_new_tokens, stop)), "scores": reference.scores(p, t)} for p in ids]
    reference.close()
    report: dict = {"model": str(model_dir), "prompts": len(conversations), "max_new_tokens": max_new_tokens,
                    "prompt_lengths": [len(p) for p in ids], "reference": "the model directory, float32, transformers",
                    "reference_outputs": [r["tokens"] for r in ref], "backends": {}}
    n_ctx = max(len(p) for p in ids) + max_new_tokens + 8
    for name, path in gguf_files.items():
        report["backends"][f"gguf-{name}"] = _gguf_row(Path(path), tok, texts, ids, ref, max_new_tokens, stop, n_ctx)
    return report


def summary_line(report: dict) -> str:
    b = report["backends"]
    parts = [f"identical_{k.removeprefix('gguf-')}={v['rate']:.3f}" for k, v in b.items() if k.startswith("gguf-")]
    if "gguf-f16" in b:
        parts.append(f"max_logit_diff_f16={b['gguf-f16']['max_logit_diff']:.4f}")
    return " ".join(parts)


def table(report: dict) -> str:
    rows = [f"{'backend':<12} {'identical':>9} {'rate':>6} {'max|dlogit|':>12} {'argmax agree':>13} {'tokenize':>9}"]
    for name, v in report["backends"].items():
        tm = f"{v['tokenize_match']:.3f}" if "tokenize_match" in v else "-"
        rows.append(f"{name:<12} {v['identical']:>4}/{report['prompts']:<4} {v['rate']:>6.3f} "
                    f"{v['max_logit_diff']:>12.4f} {v['argmax_agreement']:>13.4f} {tm:>9}")
    return "\n".join(rows)
