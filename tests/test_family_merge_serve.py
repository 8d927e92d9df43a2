"""Merge and serving for every model family (issue 15 items 3 and 5), on each family's tiny model
with its real tokenizer and chat template (tests/families.py).

Merge: a LoRA with random B matrices, merged by `export --format merged`, reloads with plain
transformers and gives the adapter model's logits. Serving: the engine's batched KV cache
(serve/batch.py) gives, step by step, the logits of a cache-free forward of each row alone while
rows of different lengths prefill together, join a running batch and leave it; prompts are longer
than the sliding window, which is shown to change the logits (so a window the cache ignored would
fail). The engine's greedy replies equal transformers' generate (which uses transformers' own
sliding-window cache) and end on the family's end-of-turn token.
"""
from __future__ import annotations

import pytest
import torch

from families import FIXTURES, NAMES, build_family_model

WINDOW = 16  # the Gemma fixtures' sliding_window; Phi-3's (2047) is shrunk to it where the window is tested
LONG = [{"role": "user", "content": "Deliver to Lyon, attention Grace Mori: 3 scarves, pink. Overnight delivery please."}]
SHORT = [{"role": "user", "content": "Hi! Which prime numbers are below ten?"}]
MULTI = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
         {"role": "user", "content": "List three prime numbers."}]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> (its tiny model directory, its tokenizer), built and loaded once per module when
    first asked for (loading a 128k/152k-token tokenizer takes seconds)."""
    root, built = tmp_path_factory.mktemp("family-models"), {}

    def get(family: str):
        if family not in built:
            path = build_family_model(family, root / family)
            built[family] = path, _tokenizer(path)
        return built[family]
    return get


def _load(path, **config):
    from tunesmith.models.load import load_model

    return load_model(path, **config).eval()


def _tokenizer(path):
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(path)


def _ids(tok, conv) -> list[int]:
    from tunesmith.data.tokenize import prompt_ids

    return prompt_ids(tok, conv)


@torch.no_grad()
def _last_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one sequence, alone and without a cache."""
    return model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].float()


def _window(family: str) -> dict:
    """Config overrides that make the family's sliding window matter at test lengths."""
    sw = FIXTURES[family].config.get("sliding_window")
    return {"sliding_window": WINDOW} if sw is not None and sw > WINDOW else {}


# ---------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("family", NAMES)
def test_merged_model_reloads_and_equals_the_adapter(family, family_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import stop_tokens
    from tunesmith.export import export_run
    from tunesmith.models.registry import resolve_model
    from tunesmith.testing import random_lora_run

    path, base_tok = family_dir(family)
    base = resolve_model(str(path))
    run = random_lora_run(base, tmp_path / "run", r=4, scale=0.05, seed=3)
    out = export_run(run, "merged", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # transformers alone
    tok = AutoTokenizer.from_pretrained(str(out))
    assert not (out / "adapter_config.json").exists()
    adapter = PeftModel.from_pretrained(_load(base.path), str(run / "adapter")).eval()
    ids = _ids(tok, MULTI)
    assert ids == _ids(base_tok, MULTI) and len(ids) > WINDOW  # the run's template and tokens travel with it
    want = _last_logits(adapter, ids)
    diff = float((_last_logits(merged, ids) - want).abs().max())
    assert diff < 1e-4, (family, diff)
    # the adapter really changes the model (else equal logits prove nothing)
    assert float((_last_logits(_load(base.path), ids) - want).abs().max()) > 1e-3
    # the merged generation config stops at the family's end of turn first
    eos = merged.generation_config.eos_token_id
    assert (eos if isinstance(eos, list) else [eos])[0] == stop_tokens(tok).end_of_turn_id


# ---------------------------------------------------------------------------------------- serving
@pytest.mark.parametrize("family", NAMES)
@torch.no_grad()
def test_batched_cache_edits_keep_each_rows_logits(family, family_dir):
    """Drive serve/batch.py's KVBatch through prefill of two rows, steps, a third row joining (its
    cache merged by left padding), a row leaving (columns trimmed) and a split; after every forward
    each row's logits equal a cache-free forward of that row's tokens alone."""
    from tunesmith.serve.batch import KVBatch

    path, tok = family_dir(family)
    model = _load(path, **_window(family))
    window = getattr(model.config, "sliding_window", None)
    forward = lambda names, **kw: model(**kw).logits[:, -1, :].float()  # noqa: E731
    batch = KVBatch(forward, tok.pad_token_id, torch.device("cpu"))
    seqs = [_ids(tok, LONG), _ids(tok, SHORT)]
    feed = iter(torch.randint(100, 1000, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    worst = 0.0

    def check(logits, rows):
        nonlocal worst
        for i, seq in enumerate(rows):
            worst = max(worst, float((logits[i] - _last_logits(model, seq)).abs().max()))

    def steps(n, rows):
        for _ in range(n):
            tokens = [next(feed) for _ in rows]
            for seq, t in zip(rows, tokens):
                seq.append(t)
            check(batch.step(tokens), rows)

    check(batch.prefill(seqs, [None, None]), seqs)
    steps(3, seqs)
    seqs.append(_ids(tok, MULTI))
    check(batch.prefill([seqs[2]], [None]), seqs[2:])            # joins the running batch
    steps(3, seqs)
    batch.keep([0, 2])                                            # the longest row stays; the trim is a no-op
    seqs = [seqs[0], seqs[2]]
    steps(2, seqs)
    batch.keep([1])                                               # leading all-padding columns trimmed
    seqs = [seqs[1]]
    steps(2, seqs)
    assert worst < 1e-4, (family, worst)
    if window is not None:
        assert max(len(s) for s in seqs) > window
        # the window matters here: the same weights with full attention give other logits
        types = getattr(model.config, "layer_types", None)
        full = _load(path, **({"layer_types": ["full_attention"] * len(types)} if types else {"sliding_window": None}))
        assert float((_last_logits(full, seqs[0]) - _last_logits(model, seqs[0])).abs().max()) > 1e-3


def _head_that_stops(model, prompts: list[list[int]], stop: int, limit: int) -> None:
    """Give the model its own random output head (untied, so the input embeddings stay) on which
    greedy decoding of prompts[1] ends on `stop` after a few tokens, and of the others does not.
    Random because the tied tiny Gemmas echo their last input token (the scaled embedding dominates
    the residual stream), which makes every greedy reply one repeated token; `stop`'s row then
    becomes 1.5x the row of a token only prompts[1]'s reply picks (a test device: the tiny random
    models never pick the end of turn by themselves). generate() is run on the edited model too."""
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(head.weight.shape, generator=gen) * head.weight.detach().std()
    head.weight = torch.nn.Parameter(weight)
    replies = [_generate(model, p, limit, []) for p in prompts]
    others = set(replies[0]) | set(replies[2])
    n = next(i for i in range(2, limit) if replies[1][i] not in others | set(replies[1][:i]))
    weight.data[stop] = 1.5 * weight.data[replies[1][n]]


@torch.no_grad()
def _generate(model, ids: list[int], max_new: int, eos: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos or None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", NAMES)
def test_engine_greedy_equals_generate_and_stops_on_end_of_turn(family, family_dir):
    """Two concurrent requests of different lengths share a batch (a third joins when one ends);
    each reply equals transformers' generate on its prompt alone, and the one whose model says the
    family's end of turn stops there with finish_reason 'stop'."""
    from tunesmith.data.templates import stop_ids, stop_tokens
    from tunesmith.serve.engine import Engine, GenRequest

    path, tok = family_dir(family)
    model = _load(path, **_window(family))
    stops = stop_tokens(tok)
    assert stops.end_of_turn == {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
                                 "mistral": "</s>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>",
                                 "phi3": "<|end|>"}[family]
    prompts = [_ids(tok, LONG), _ids(tok, SHORT), _ids(tok, MULTI)]
    assert len(prompts[0]) != len(prompts[1]) and min(map(len, prompts)) > WINDOW
    limits = [12, 12, 6]
    _head_that_stops(model, prompts, stops.end_of_turn_id, max(limits))
    eos = stop_ids(tok, model.generation_config)
    refs = [_generate(model, p, n, eos) for p, n in zip(prompts, limits)]
    assert refs[1][-1] == stops.end_of_turn_id and len(refs[1]) < limits[1]

    with Engine(model, tok, "base", max_batch=2, batch_wait_ms=300) as engine:
        handles = [engine.submit(GenRequest(p, "base", max_tokens=n)) for p, n in zip(prompts, limits)]
        out = [h.result() for h in handles]
        assert engine.stats["max_rows"] == 2 and engine.stats["prefills"] == 2  # batched, then joined
    for o, ref, n in zip(out, refs, limits):
        assert o.token_ids == ref, (family, o.token_ids, ref)
        assert o.finish_reason == ("stop" if ref[-1] in eos else "length")
    assert out[1].finish_reason == "stop" and stops.end_of_turn not in out[1].text


def test_layers_without_an_editable_kv_cache_are_refused():
    """Linear-attention (recurrent) and chunked-attention layers cannot be merged/trimmed by column."""
    import transformers

    from tunesmith.errors import ModelError
    from tunesmith.serve.batch import check_servable

    assert check_servable(transformers.Gemma2Config(num_hidden_layers=2)) == ["sliding_attention", "full_attention"]
    assert check_servable(transformers.MistralConfig(num_hidden_layers=1, sliding_window=None)) == ["full_attention"]
    with pytest.raises(ModelError, match=r"mamba model has linear_attention layers.*cannot merge or trim"):
        check_servable(transformers.MambaConfig(num_hidden_layers=2))
    with pytest.raises(ModelError, match=r"chunked_attention"):
        check_servable(transformers.Llama4TextConfig(num_hidden_layers=2))
