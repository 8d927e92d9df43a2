"""The serving engine's prefix cache: requests sharing a prompt head reuse its keys and values and
get the same greedy tokens and logprobs as with the cache off (and as transformers' generate);
heads of any length (block-aligned or not, shorter than a block, the whole prompt); rows with and
without a cached head in one prefill and joining running batches; no reuse across adapters; LRU
eviction under a byte budget that is never exceeded; refusals of bad budgets and of models whose
layers the cache cannot serve exactly."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import build_tokenizer, tiny_llama
from test_serve_engine import reference, reference_adapter, write_lora
from tunesmith.errors import ConfigError
from tunesmith.serve.engine import Engine, GenRequest
from tunesmith.serve.prefix_cache import BLOCK, PrefixCache, check_budget, for_model

BASE = "tiny"
TOL = 1e-5
BLOCK_BYTES = 2 * 2 * 2 * BLOCK * 16 * 4  # tiny_llama: layers x (k, v) x kv heads x tokens x head dim x fp32


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=3).eval()


def ids(seed: int, n: int) -> list[int]:
    """n token ids (never the pad 0 or the EOS 2), fixed by seed: exact lengths, unlike text."""
    return (torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))).tolist()


def run(engine: Engine, waves: list[list[GenRequest]]):
    """Each wave submitted at once (so its rows share prefills and join running batches), after
    the previous wave has ended."""
    out = []
    for wave in waves:
        handles = [engine.submit(r) for r in wave]
        out.append([h.result() for h in handles])
    return out


def assert_same(a, b):
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert [e.token for e in a.logprobs] == [e.token for e in b.logprobs]
    for x, y in zip(a.logprobs, b.logprobs):
        assert abs(x.logprob - y.logprob) < TOL
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
        assert max(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)) < TOL


def shared_head_waves():
    """Users behind a 40-token system prompt (2 full blocks and 8 tokens), behind 32 and 15 tokens
    of another, repeats of whole prompts, and unrelated prompts: a first wave that fills the cache,
    then two waves that read it, of 4..22-token replies (rows leave and others join)."""
    system, other = ids(1, 40), ids(2, 32)
    prompts = ([system + ids(10 + i, 3 + 5 * i) for i in range(6)]     # head 40: 2 blocks reused
               + [other + ids(20 + i, 1 + 7 * i) for i in range(3)]   # head 32 (aligned): 1 or 2 blocks
               + [other[:15] + ids(30 + i, 20) for i in range(2)]     # head 15: shorter than a block
               + [ids(40 + i, 9 + 13 * i) for i in range(3)]          # unrelated
               + [other, system[:BLOCK * 2], system + ids(10, 3)])    # whole prompts already seen
    first = [GenRequest(p, BASE, max_tokens=5, logprobs=3) for p in (prompts[0], prompts[6], prompts[9])]
    later = [GenRequest(p, BASE, max_tokens=4 + (3 * i) % 19, logprobs=3) for i, p in enumerate(prompts)]
    return [first, later[:9], later[9:]]


def test_shared_heads_equal_outputs_with_and_without_the_cache(tok, model):
    waves = shared_head_waves()
    with Engine(model, tok, BASE, max_batch=6, batch_wait_ms=50, prefix_cache_mb=0) as eng:
        assert eng.prefix is None
        plain = run(eng, waves)
    with Engine(model, tok, BASE, max_batch=6, batch_wait_ms=50) as eng:
        cached = run(eng, waves)
        stats = dict(eng.stats)
    for wave, a_wave, b_wave in zip(waves, plain, cached):
        for req, a, b in zip(wave, a_wave, b_wave):
            assert_same(a, b)
    for req, out in list(zip(waves[2], cached[2]))[-3:]:  # the ground truth for whole repeated prompts
        assert out.token_ids == reference(model, req.prompt_ids, req.max_tokens)
    # the cache was really read. Wave 1 misses (3); wave 2 reuses 2 blocks in each of its 9 rows; wave 3:
    # a repeat of wave 1's other[:15] prompt (2 blocks), `other` and system[:32] (1 block each: the last token
    # is computed), a repeat of a 43-token prompt (2 blocks); the other[:15] prompt and the unrelated miss (4)
    assert (stats["prefix_hits"], stats["prefix_misses"]) == (13, 7)
    assert stats["prefix_hit_tokens"] == 9 * 32 + 32 + 16 + 16 + 32
    assert stats["prefix_bytes"] == stats["prefix_blocks"] * BLOCK_BYTES and stats["prefix_evictions"] == 0


def test_no_reuse_across_adapters_and_an_unloaded_adapter_is_forgotten(tok, tmp_path):
    from test_serve_engine import fresh_base

    root = tmp_path / "adapters"
    write_lora(tok, root / "lora0", seed=1)
    q = ids(5, 40) + ids(6, 4)
    ref = {BASE: reference(fresh_base(tok), q, 6), "lora0": reference_adapter(tok, root / "lora0", q, 6)}
    assert ref[BASE] != ref["lora0"]  # else reuse across adapters could not show
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=root, preload=True) as eng:
        def ask(name):
            return eng.submit(GenRequest(q, name, max_tokens=6)).result().token_ids

        assert ask(BASE) == ref[BASE] and ask("lora0") == ref["lora0"]  # same tokens, other adapter: no hit
        assert (eng.stats["prefix_hits"], eng.stats["prefix_misses"]) == (0, 2)
        assert ask("lora0") == ref["lora0"] and ask(BASE) == ref[BASE]  # each from its own blocks
        assert (eng.stats["prefix_hits"], eng.stats["prefix_hit_tokens"]) == (2, 64)
        eng.unload_adapter("lora0")  # a later adapter of that name may be another one
        assert eng.stats["prefix_blocks"] == 2 and {b.key for b in eng.prefix._blocks.values()} == {None}
        assert ask("lora0") == ref["lora0"] and eng.stats["prefix_misses"] == 3


def kv_of(prompt: list[int]):
    """Fake keys and values [1 head, tokens, 1] holding each token's id (values: minus it)."""
    t = torch.tensor(prompt, dtype=torch.float32)[None, :, None]
    return lambda a, b: [(t[:, a:b], -t[:, a:b])]


def present(cache: PrefixCache, prompt: list[int]) -> list[bool]:
    """Which full blocks of the prompt are cached (without touching the LRU order)."""
    return [h in cache._blocks for h in cache.hashes(None, prompt)]


def test_lru_eviction_order_and_the_budget_is_never_exceeded():
    block_bytes = 2 * BLOCK * 4  # (k, v) x tokens x fp32
    cache = PrefixCache(4 * block_bytes)
    a, b = ids(1, 3 * BLOCK), ids(2, 2 * BLOCK)
    c = a[:BLOCK] + ids(3, BLOCK)  # shares a's first block

    def store(p):
        cache.store(None, p, kv_of(p))
        assert cache.bytes <= cache.budget and cache.bytes == len(cache) * block_bytes

    store(a)
    head = cache.lookup(None, a + [7])
    assert head.length == 3 * BLOCK and torch.equal(head.layers[0][0][0, :, 0], torch.tensor(a, dtype=torch.float32))
    assert torch.equal(head.layers[0][1], -head.layers[0][0])
    store(b)  # 5 blocks > 4: the least recent goes, which is a's tail (a chain's root outlives its children)
    assert present(cache, a) == [True, True, False] and present(cache, b) == [True, True]
    assert cache.lookup(None, a + [7]).length == 2 * BLOCK  # a is now more recent than b
    store(c)  # c's second block evicts b's tail, then b's root
    assert present(cache, b) == [True, False] and present(cache, c) == [True, True]
    assert present(cache, a) == [True, True, False]
    assert cache.stats["prefix_evictions"] == 2
    store(ids(4, 6 * BLOCK))  # a prompt longer than the budget: its deepest blocks go first, then the rest
    assert cache.bytes == 4 * block_bytes and present(cache, ids(4, 6 * BLOCK)) == [True] * 4 + [False] * 2
    assert cache.lookup(None, b) is None and cache.lookup(None, c + [1]) is None
    cache.drop(None)
    assert len(cache) == 0 and cache.bytes == 0 == cache.stats["prefix_bytes"]
    small = PrefixCache(block_bytes - 1)  # one block is larger than the whole budget
    small.store(None, a, kv_of(a))
    assert len(small) == 0 and small.bytes == 0


def test_outputs_stay_equal_when_blocks_are_evicted(tok, model):
    """A budget of 3 blocks against 4 system prompts of 2 blocks each: blocks are evicted all the time,
    heads are found partly or not at all, and every output stays what the cache-less engine gives."""
    systems = [ids(50 + i, 2 * BLOCK + 3) for i in range(4)]
    waves = [[GenRequest(systems[(w + i) % 4] + ids(60 + 7 * w + i, 2 + i), BASE, max_tokens=3 + i, logprobs=2)
              for i in range(3)] for w in range(6)]
    with Engine(model, tok, BASE, max_batch=3, prefix_cache_mb=0) as eng:
        plain = run(eng, waves)
    with Engine(model, tok, BASE, max_batch=3, prefix_cache_mb=3 * BLOCK_BYTES / 2 ** 20) as eng:
        high = []
        store = eng.prefix.store

        def watched(*args):
            store(*args)
            high.append(eng.prefix.bytes)

        eng.prefix.store = watched
        cached = run(eng, waves)
        stats = dict(eng.stats)
    for a_wave, b_wave in zip(plain, cached):
        for a, b in zip(a_wave, b_wave):
            assert_same(a, b)
    assert max(high) <= 3 * BLOCK_BYTES and stats["prefix_evictions"] > 0 and stats["prefix_hits"] > 0


def test_prompt_logprob_rows_never_read_the_cache_but_fill_it(tok, model):
    system = ids(70, 2 * BLOCK + 5)
    echo = GenRequest(system + ids(71, 4), BASE, max_tokens=0, logprobs=2, prompt_logprobs=True)
    with Engine(model, tok, BASE, prefix_cache_mb=0) as eng:
        want = eng.submit(echo).result()
    with Engine(model, tok, BASE) as eng:
        first = eng.submit(echo).result()
        again = eng.submit(echo).result()  # its head is cached now: still computed whole
        assert eng.stats["prefix_query_tokens"] == 0 and eng.stats["prefix_blocks"] == 2
        eng.submit(GenRequest(system + ids(72, 2), BASE, max_tokens=2)).result()
        assert eng.stats["prefix_hits"] == 1  # a plain row reads what the echo rows stored
    for got in (first, again):
        assert [e.token for e in got.prompt_logprobs] == [e.token for e in want.prompt_logprobs]
        assert got.prompt_logprobs[0].logprob is None
        for x, y in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert abs(x.logprob - y.logprob) < TOL


def test_sliding_window_models_run_without_the_cache(caplog):
    from transformers import Gemma2Config, MistralConfig

    with caplog.at_level(logging.INFO, logger="tunesmith.serve"):
        assert for_model(Gemma2Config(num_hidden_layers=2), 64) is None
    assert "prefix cache off" in caplog.text and "sliding_attention" in caplog.text
    assert for_model(MistralConfig(num_hidden_layers=2, sliding_window=None), 64) is not None
    assert for_model(MistralConfig(num_hidden_layers=2, sliding_window=None), 0) is None


@pytest.mark.parametrize("bad", [-1, "lots", float("nan"), float("inf"), None])
def test_bad_budgets_are_refused_before_anything_loads(tok, model, bad, capsys):
    from tunesmith.cli import main
    from tunesmith.serve.app import serve

    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        check_budget(bad)
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        Engine(model, tok, BASE, prefix_cache_mb=bad)
    with pytest.raises(ConfigError, match="--prefix-cache-mb"):
        serve("no-such-model-dir", prefix_cache_mb=bad)  # refused before the model is looked up
    if isinstance(bad, (int, float)):
        assert main(["serve", "no-such-model-dir", "--prefix-cache-mb", str(bad)]) == 2
        assert "--prefix-cache-mb" in capsys.readouterr().err
