"""The serving engine: batched decoding equals one-at-a-time and transformers' generate, mixed LoRA
batches equal each adapter alone, stop/EOS/length, seeded sampling, streaming, adapter names."""
from __future__ import annotations

import asyncio
import json
import pathlib
import time

import pytest
import torch

from conftest import build_tokenizer, tiny_llama
from tunesmith.errors import DataError, ModelError
from tunesmith.serve.decode import RowText, sample
from tunesmith.serve.engine import Engine, GenRequest

BASE = "tiny"
TEXTS = ["Deliver to Lyon", "3 scarves, pink. Overnight delivery please.", "Hello there.",
         "What is the capital of France? Paris is the capital.", "Grace Mori", "0123456789 {}",
         "Deliver to Lyon, attention Grace Mori: 3 scarves", "Hi"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def fresh_base(tok):
    return tiny_llama(len(tok)).eval()


def write_lora(tok, path: pathlib.Path, seed: int, **cfg) -> pathlib.Path:
    """A LoRA adapter with random non-zero B (a fresh one is the identity), saved in PEFT format."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_base(tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **cfg))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_A" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(4):
        write_lora(tok, root / f"lora{i}", seed=i + 1)
    write_lora(tok, root / "dora", seed=9, use_dora=True)
    return root


def prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


@torch.no_grad()
def reference(model, prompt: list[int], max_new: int, eos=2) -> list[int]:
    """transformers' greedy generate on the prompt alone: the ground truth."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def reference_adapter(tok, path, prompt, max_new):
    from peft import PeftModel

    return reference(PeftModel.from_pretrained(fresh_base(tok), str(path)).eval(), prompt, max_new)


def submit_all(engine, reqs):
    handles = [engine.submit(r) for r in reqs]
    return [h.result() for h in handles]


def test_batched_greedy_equals_alone_and_generate(tok):
    """8 prompts of different lengths and lengths of reply, through a 4-row batch: rows leave as
    they end and waiting ones join the running batch (their cache merged by left-padding)."""
    ps, model = prompts(tok), fresh_base(tok)
    reqs = [GenRequest(p, BASE, max_tokens=4 + 3 * i) for i, p in enumerate(ps)]
    with Engine(model, tok, BASE, max_batch=4, batch_wait_ms=50) as eng:
        batched = submit_all(eng, reqs)
        assert eng.stats["max_rows"] == 4 and eng.stats["prefills"] >= 3  # batched, and rows joined
        alone = [eng.submit(r).result() for r in reqs]
    for r, b, a in zip(reqs, batched, alone):
        ref = reference(model, r.prompt_ids, r.max_tokens)
        assert b.token_ids == a.token_ids == ref
        assert b.text == tok.decode(ref, skip_special_tokens=True)
        assert (b.finish_reason, b.completion_tokens, b.prompt_tokens) == ("length", r.max_tokens, len(r.prompt_ids))


def test_mixed_adapter_batch_equals_each_adapter_alone(tok, adapters):
    ps = prompts(tok)
    names = [BASE, "lora0", "lora1", "lora2", "lora3"]
    reqs = [GenRequest(ps[i % len(ps)], names[i % 5], max_tokens=6) for i in range(10)]
    # max_batch = the burst and a gathering window no machine outlasts: the engine prefills as soon as
    # all 10 have arrived (a full batch ends the wait), however loaded the machine is
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters, preload=False, max_batch=10,
                batch_wait_ms=600_000) as eng:
        for n in names[1:]:
            eng.load_adapter(n)  # loaded before the burst, so all 10 rows share one prefill
        out = submit_all(eng, reqs)
        assert eng.stats["prefills"] == 1 and eng.stats["max_rows"] == 10
    refs = {}
    for r, o in zip(reqs, out):
        key = (r.model, tuple(r.prompt_ids))
        if key not in refs:
            refs[key] = (reference(fresh_base(tok), r.prompt_ids, 6) if r.model == BASE
                         else reference_adapter(tok, adapters / r.model, r.prompt_ids, 6))
        assert o.token_ids == refs[key], r.model
    # the adapters really change the output (else the test proves nothing)
    assert len({tuple(o.token_ids) for r, o in zip(reqs, out) if r.prompt_ids == ps[0]}) > 1


def test_switching_between_base_one_adapter_and_mixed_batches_stays_exact(tok, adapters):
    """Batches of the base alone, of one adapter, and mixed ones take different PEFT paths (layers
    off, set_adapter, per-row routing); one after the other each must still give its reference."""
    p = prompts(tok)[0]
    ref = {BASE: reference(fresh_base(tok), p, 5)}
    for name in ("lora0", "lora1"):
        ref[name] = reference_adapter(tok, adapters / name, p, 5)
    assert len({tuple(v) for v in ref.values()}) == 3
    sequence = [[BASE], ["lora0"], [BASE], ["lora1", "lora1"], ["lora0", BASE, "lora1"], [BASE], ["lora1"]]
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters, batch_wait_ms=200, preload=True) as eng:
        for names in sequence:
            out = submit_all(eng, [GenRequest(p, n, max_tokens=5) for n in names])
            assert [o.token_ids for o in out] == [ref[n] for n in names], names


def test_dora_rows_run_apart_and_stay_exact(tok, adapters):
    ps = prompts(tok)
    reqs = [GenRequest(ps[0], "dora", max_tokens=5), GenRequest(ps[0], "lora0", max_tokens=5),
            GenRequest(ps[1], "dora", max_tokens=5), GenRequest(ps[1], BASE, max_tokens=5)]
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters, batch_wait_ms=50) as eng:
        out = submit_all(eng, reqs)
        assert sorted(eng.loaded()) == ["dora", "lora0"]
    for r, o in zip(reqs, out):
        ref = (reference(fresh_base(tok), r.prompt_ids, 5) if r.model == BASE
               else reference_adapter(tok, adapters / r.model, r.prompt_ids, 5))
        assert o.token_ids == ref, r.model


def test_non_lora_adapter_refused(tok, tmp_path):
    from peft import IA3Config, get_peft_model

    get_peft_model(fresh_base(tok), IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(
        tmp_path / "ia3")
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=tmp_path) as eng:
        with pytest.raises(ModelError, match="IA3.*tunesmith export"):
            eng.load_adapter("ia3")
        with pytest.raises(ModelError, match="IA3"):
            eng.submit(GenRequest(prompts(tok)[0], "ia3", max_tokens=3)).result()
        assert eng.submit(GenRequest(prompts(tok)[0], BASE, max_tokens=3)).result().completion_tokens == 3


def _stream(handle):
    deltas = list(handle.stream())
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason is not None
    return deltas


def test_stop_string_ends_row_and_stream_never_shows_it(tok):
    model, p = fresh_base(tok), prompts(tok)[3]
    full = tok.decode(reference(model, p, 30), skip_special_tokens=True)
    stop = full[8:11]  # a stop string inside the greedy reply
    with Engine(model, tok, BASE) as eng:
        h = eng.submit(GenRequest(p, BASE, max_tokens=30, stop=["zzz-never", stop]))
        deltas = _stream(h)
        res = h.result()
    assert res.finish_reason == "stop" and res.text == full[:full.find(stop)]
    assert "".join(d.text for d in deltas) == res.text
    assert res.completion_tokens < 30


def test_row_text_holds_back_stop_prefixes_and_split_characters(tok):
    # "é" is two bytes; byte-level BPE has a token for each byte.
    first, second = tok.convert_tokens_to_ids(["Ã", "©"])
    row = RowText(tok, [])
    assert row.add(first) == ("", False)          # half a character: nothing released
    assert row.add(second) == ("é", False)
    ids = tok("Paris is the capital.")["input_ids"]
    row = RowText(tok, ["the cap"])
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = row.add(t)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "Paris is " == row.text


def test_eos_from_generation_config_list(tok):
    """EOS ids are the tokenizer's plus every id in generation_config.eos_token_id."""
    model, p = fresh_base(tok), prompts(tok)[2]
    ref = reference(model, p, 10)
    model.generation_config.eos_token_id = [2, ref[3]]
    expect = reference(model, p, 10, eos=[2, ref[3]])
    with Engine(model, tok, BASE) as eng:
        res = eng.submit(GenRequest(p, BASE, max_tokens=10)).result()
    assert res.finish_reason == "stop" and res.token_ids == expect == ref[:ref.index(ref[3]) + 1]
    assert res.text == tok.decode(expect[:-1], skip_special_tokens=True)


def test_seeded_sampling_reproducible_in_any_batch(tok):
    ps, model = prompts(tok), fresh_base(tok)
    req = GenRequest(ps[1], BASE, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    with Engine(model, tok, BASE, batch_wait_ms=50) as eng:
        alone = eng.submit(req).result().token_ids
        others = [GenRequest(p, BASE, max_tokens=12, temperature=0.8, seed=i) for i, p in enumerate(ps)]
        together = submit_all(eng, others + [req])[-1].token_ids
        other_seed = eng.submit(GenRequest(ps[1], BASE, max_tokens=12, temperature=1.0, top_p=0.9, seed=8)).result()
        tiny_p = GenRequest(ps[1], BASE, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
        nucleus_of_one = eng.submit(tiny_p).result()
    assert alone == together
    assert other_seed.token_ids != alone
    assert nucleus_of_one.token_ids == reference(model, ps[1], 12)  # top_p that small keeps only the top token


def test_top_p_sampling_matches_float64_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits.double() / 0.7, -1)
    cum = torch.cumsum(probs, -1)
    keep = int((cum < 0.8).sum()) + 1  # smallest top set reaching 0.8
    target = probs[:keep] / probs[:keep].sum()
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, 0.7, 0.8, gen) for _ in range(4000)])
    assert set(draws.tolist()) <= set(range(keep))
    freq = torch.bincount(draws, minlength=keep)[:keep].double() / len(draws)
    assert torch.allclose(freq, target, atol=0.03)


def test_adapter_load_unload_by_name(tok, adapters):
    p = prompts(tok)[0]
    ref = reference_adapter(tok, adapters / "lora2", p, 5)
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters) as eng:
        assert eng.models() == [BASE, "dora", "lora0", "lora1", "lora2", "lora3"]
        assert eng.loaded() == []
        assert eng.submit(GenRequest(p, "lora2", max_tokens=5)).result().token_ids == ref  # lazy load
        eng.load_adapter("lora1")
        assert eng.loaded() == ["lora1", "lora2"]
        long = eng.submit(GenRequest(p, "lora1", max_tokens=60))
        eng.unload_adapter("lora1")  # waits for the running row, which finishes intact
        assert long.result().completion_tokens == 60 and eng.loaded() == ["lora2"]
        eng.unload_adapter("lora2")
        assert eng.loaded() == []
        base_now = eng.submit(GenRequest(p, BASE, max_tokens=5)).result().token_ids
        assert eng.submit(GenRequest(p, "lora2", max_tokens=5)).result().token_ids == ref  # reloaded
    assert base_now == reference(fresh_base(tok), p, 5)  # unloading the last adapter left the base clean


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "..", ".hidden", "", "lora0/../../outside",
                                  "x" * 200, "outside-link"])
def test_bad_model_names_refused_and_never_opened(tok, adapters, tmp_path, monkeypatch, name):
    write_lora(tok, adapters.parent / "outside", seed=5)
    link = adapters / "outside-link"
    if not link.exists():
        link.symlink_to(adapters.parent / "outside")
    eng = Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters)
    touched = []

    def spy(orig):
        return lambda self, *a, **k: touched.append(str(self)) or orig(self, *a, **k)

    for meth in ("read_text", "read_bytes", "open", "iterdir"):
        monkeypatch.setattr(pathlib.Path, meth, spy(getattr(pathlib.Path, meth)))
    with pytest.raises(ModelError, match="unknown model"):
        eng.load_adapter(name)
    with eng:
        with pytest.raises(ModelError, match="unknown model"):
            eng.submit(GenRequest([5, 6], name))
    with pytest.raises(ModelError):
        eng.tokenizer_for(name)
    assert not [t for t in touched if "outside" in t or t.startswith("/etc")]
    assert eng.loaded() == [] and "outside-link" not in eng.models()


def test_unknown_model_and_bad_requests(tok):
    with Engine(fresh_base(tok), tok, BASE) as eng:
        with pytest.raises(ModelError, match="unknown model 'nope'; available: tiny"):
            eng.submit(GenRequest([5], "nope"))
        with pytest.raises(DataError, match="empty"):
            eng.submit(GenRequest([], BASE))
        with pytest.raises(DataError, match="context is 512"):
            eng.submit(GenRequest([5] * 512, BASE))
        with pytest.raises(DataError, match="top_p"):
            eng.submit(GenRequest([5], BASE, top_p=0))
        near_end = eng.submit(GenRequest([5] * 508, BASE, max_tokens=50)).result()
    assert (near_end.finish_reason, near_end.completion_tokens) == ("length", 4)  # clamped to the context


def test_cancel_frees_the_row(tok):
    ps = prompts(tok)
    with Engine(fresh_base(tok), tok, BASE) as eng:
        h = eng.submit(GenRequest(ps[0], BASE, max_tokens=400))
        other = eng.submit(GenRequest(ps[1], BASE, max_tokens=8))
        while eng.stats["steps"] < 3:
            time.sleep(0.005)
        h.cancel()
        res = h.result()
        assert res.finish_reason == "cancelled" and res.completion_tokens < 400
        deadline = time.time() + 5
        while eng.active() and time.time() < deadline:
            time.sleep(0.01)
        assert eng.active() == 0
        assert other.result().token_ids == reference(fresh_base(tok), ps[1], 8)


def test_async_stream_joins_to_result(tok):
    p = prompts(tok)[4]

    async def run(eng):
        h = eng.submit(GenRequest(p, BASE, max_tokens=15))
        pieces = [d async for d in h.astream()]
        return pieces, h.result()

    with Engine(fresh_base(tok), tok, BASE) as eng:
        pieces, res = asyncio.run(run(eng))
    assert "".join(d.text for d in pieces) == res.text and pieces[-1].finish_reason == "length"
    assert res.token_ids == reference(fresh_base(tok), p, 15)


def test_run_directory_adapter_uses_its_tokenizer(tok, tmp_path):
    """A run directory in the adapters folder: its adapter/ weights and its tokenizer/ (template)."""
    run = tmp_path / "myrun"
    write_lora(tok, run / "adapter", seed=3)
    own = build_tokenizer(chat_template="{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    own.save_pretrained(run / "tokenizer")
    (run / "manifest.json").write_text(json.dumps({"model": {"id": "tiny"}}))
    (tmp_path / "not-an-adapter").mkdir()
    p = prompts(tok)[0]
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=tmp_path) as eng:
        assert eng.models() == [BASE, "myrun"]
        rendered = eng.tokenizer_for("myrun").apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert rendered == "<<hi>>" and eng.tokenizer_for(BASE) is tok
        res = eng.submit(GenRequest(p, "myrun", max_tokens=5)).result()
    assert res.token_ids == reference_adapter(tok, run / "adapter", p, 5)


@pytest.mark.slow
def test_embedded_model_mixed_adapters_equal_peft_reference(embedded_model, tmp_path):
    """On the real model (ChatML, EOS from generation_config): a batch mixing the base and two
    LoRA adapters gives each row what PEFT gives with that adapter set (or disabled) alone."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.testing import randomise_lora

    model, tok = load_model(embedded_model.path).eval(), load_tokenizer(embedded_model.path)
    for i in range(2):
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        randomise_lora(peft, i, 0.2)
        peft.save_pretrained(tmp_path / f"a{i}")
        model = peft.unload()
    chats = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Say hi.")]
    ids = [prompt_ids(tok, c) for c in chats]
    jobs = [(p, m) for p in ids for m in ("base", "a0", "a1")]
    ref = PeftModel.from_pretrained(model, str(tmp_path / "a0"), adapter_name="a0")
    ref.load_adapter(str(tmp_path / "a1"), adapter_name="a1")
    expect = []
    for p, m in jobs:
        if m == "base":
            with ref.disable_adapter():
                expect.append(reference(ref, p, 6, eos=model.generation_config.eos_token_id))
        else:
            ref.set_adapter(m)
            expect.append(reference(ref, p, 6, eos=model.generation_config.eos_token_id))
    model = ref.unload()
    with Engine(model, tok, "base", adapters_dir=tmp_path, preload=True, max_batch=len(jobs),
                batch_wait_ms=600_000) as eng:  # a full batch ends the wait: one prefill on any machine
        out = submit_all(eng, [GenRequest(p, m, max_tokens=6) for p, m in jobs])
        assert eng.stats["prefills"] == 1
    assert [o.token_ids for o in out] == expect
    assert len({tuple(e) for e, (p, _) in zip(expect, jobs) if p == ids[0]}) > 1  # the adapters matter


def test_adapter_of_another_base_refused_and_base_left_clean(tok, adapters, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "wrong")
    write_lora(tok, tmp_path / "right", seed=1)
    p = prompts(tok)[0]
    model = fresh_base(tok)
    with Engine(model, tok, BASE, adapters_dir=tmp_path) as eng:
        for _ in range(2):  # first as the first adapter ever loaded, then beside another
            with pytest.raises(ModelError, match="'wrong' does not load onto this base model.*size mismatch"):
                eng.load_adapter("wrong")
            assert eng.submit(GenRequest(p, BASE, max_tokens=6)).result().token_ids == reference(fresh_base(tok), p, 6)
            assert "wrong" not in eng.loaded()
            eng.load_adapter("right")
        assert eng.submit(GenRequest(p, "right", max_tokens=6)).result().token_ids == \
            reference_adapter(tok, tmp_path / "right", p, 6)
        eng.unload_adapter("right")
    assert not any("lora" in n for n, _ in model.named_modules())  # the base holds no adapter layers


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(tok):
    p = prompts(tok)[0]
    with Engine(fresh_base(tok), tok, BASE) as eng:
        real, calls = eng.adapters.forward, []

        def flaky(names, **inputs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory (simulated)")
            return real(names, **inputs)

        eng.adapters.forward = flaky
        with pytest.raises(RuntimeError, match="simulated"):
            eng.submit(GenRequest(p, BASE, max_tokens=10)).result()
        assert eng.submit(GenRequest(p, BASE, max_tokens=10)).result().token_ids == reference(fresh_base(tok), p, 10)


@pytest.mark.parametrize("phase", ["prefill", "step"])
def test_a_poisoned_adapter_fails_only_its_own_requests(tok, adapters, phase):
    """Rows of 4 adapters and the base share a batch; every forward that holds a 'lora1' row raises
    (from the prefill on, or from its 4th decode step on). The lora1 requests fail with that error;
    every other request completes with exactly the tokens it gets alone, and the engine goes on."""
    ps = prompts(tok)
    names = [BASE, "lora0", "lora1", "lora2", BASE, "lora1", "lora3"]
    reqs = [GenRequest(ps[i], n, max_tokens=8) for i, n in enumerate(names)]
    with Engine(fresh_base(tok), tok, BASE, adapters_dir=adapters, batch_wait_ms=500, preload=True) as eng:
        real, steps = eng.adapters.forward, []

        def poisoned(names, **inputs):
            if "lora1" in names:
                steps.append(inputs["input_ids"].shape[1] == 1)
                if phase == "prefill" or sum(steps) > 3:
                    raise RuntimeError("poisoned adapter (simulated)")
            return real(names, **inputs)

        eng.adapters.forward = poisoned
        handles = [eng.submit(r) for r in reqs]
        for r, h in zip(reqs, handles):
            if r.model == "lora1":
                with pytest.raises(RuntimeError, match="poisoned"):
                    h.result()
            else:
                ref = (reference(fresh_base(tok), r.prompt_ids, 8) if r.model == BASE
                       else reference_adapter(tok, adapters / r.model, r.prompt_ids, 8))
                assert h.result().token_ids == ref, r.model
        assert eng.stats["max_rows"] == len(reqs) or phase == "prefill"  # they did share a batch
        eng.adapters.forward = real
        assert eng.submit(GenRequest(ps[2], "lora1", max_tokens=8)).result().token_ids == \
            reference_adapter(tok, adapters / "lora1", ps[2], 8)


def test_a_row_whose_sampling_fails_fails_alone():
    from tunesmith.serve.decode import choose, make_generator

    logits = torch.randn(3, 20)
    logits[1] = float("nan")
    out = choose(logits, [(0.0, 1.0, None), (1.0, 1.0, make_generator(1)), (1.0, 0.9, make_generator(2))])
    assert out[0] == int(logits[0].argmax()) and isinstance(out[1], RuntimeError) and isinstance(out[2], int)


def test_off_main_thread_returns_raises_and_leaves_the_calling_thread_idle():
    import threading

    from tunesmith.serve.engine import off_main_thread

    caller = threading.current_thread()
    assert off_main_thread(lambda: threading.current_thread() is not caller) is True
    with pytest.raises(DataError, match="bad"):
        off_main_thread(lambda: (_ for _ in ()).throw(DataError("bad")))
