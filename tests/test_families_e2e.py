"""Issue 15's acceptance: for each model family users fine-tune, the whole path on its tiny model
with its real tokenizer and chat template (tests/families.py): train a LoRA run -> merge ->
GGUF f16 -> llama.cpp, and serve the run, each checked against transformers on the adapter.

One reference per family: the run's adapter on its base in transformers (export/parity.py's
reference, greedy, float32). The merged model must reproduce its logits; llama.cpp must tokenise
the rendered prompts into the very ids transformers uses and continue them greedily the same way;
the server must return the same tokens for two concurrent requests and stop on the family's end
of turn. Prompts are longer than the fixtures' sliding window (16 tokens), so the window matters.
"""
from __future__ import annotations

import pytest

from conftest import train_tiny_run
from families import NAMES, build_family_model

PROMPTS = [
    [{"role": "user", "content": "Deliver to Lyon, attention Grace Mori: 3 scarves, pink. Overnight delivery please."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "List three prime numbers."}],
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("family-runs")


@pytest.mark.parametrize("family", NAMES)
def test_train_merge_gguf_llamacpp_serve(family, runs):
    from tunesmith.data.templates import stop_tokens
    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.export import export_run
    from tunesmith.export.parity import parity
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.serve.engine import Engine, GenRequest

    base = build_family_model(family, runs / f"{family}-base")
    run = train_tiny_run(base, runs, family, "method.name=lora", "method.r=4", "data.max_length=96", steps=2)

    report = parity(run, formats=("f16",), prompts=PROMPTS, max_new_tokens=MAX_NEW)
    merged, f16 = report["backends"]["merged"], report["backends"]["gguf-f16"]
    assert merged["max_logit_diff"] < 1e-4 and merged["rate"] == 1.0, (family, merged)
    assert f16["tokenize_match"] == 1.0, (family, f16)  # llama.cpp splits the text as transformers does
    # f16 weights against the fp32 reference: tokens equal, or a divergence only at a near-tie
    assert f16["argmax_agreement"] == 1.0 or all(
        d["reference_margin"] < 2 * d["logit_diff_there"] for d in f16["divergences"]), (family, f16)

    # the user's command: tunesmith export RUN --format gguf (merge, GGUF, Modelfile for Ollama)
    out = export_run(run, "gguf", runs / f"{family}-gguf", quant=["q8_0"])
    assert (out / f"{run.name}-q8_0.gguf").is_file() and "TEMPLATE" in (out / "Modelfile").read_text()

    tok = load_tokenizer(run / "tokenizer")
    stops = stop_tokens(tok)
    ids = [prompt_ids(tok, c) for c in PROMPTS]
    assert min(len(i) for i in ids) > 16
    with Engine(load_model(base), load_tokenizer(base), "base", adapters_dir=runs, max_batch=4) as engine:
        handles = [engine.submit(GenRequest(i, model=run.name, max_tokens=MAX_NEW)) for i in ids]
        served = [h.result() for h in handles]
    for out, ref in zip(served, report["reference_outputs"]):
        assert out.token_ids == ref, (family, out.token_ids, ref)
        # a reply that ended before the limit ended on the family's end of turn (or EOS)
        assert len(ref) == MAX_NEW or ref[-1] in stops.ids
