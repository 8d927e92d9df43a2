import pytest
import torch

from conftest import tiny_llama
from tunesmith.data.tokenize import prompt_ids
from tunesmith.generation import PRUNE_EVERY, InferenceModel, cut_at_stop, generate

LONG = " ".join(["Deliver to Lyon, attention Grace Mori: 3 scarves, pink. Overnight delivery please."] * 6)
PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Order 3 red mugs to Oslo."}],
           [{"role": "user", "content": "Hello there, what is the capital of France?"}],
           [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": LONG}]]


def one_at_a_time(model, tok, conv, n):
    """Reference: greedy decoding by hand, one unpadded prompt, no KV cache."""
    ids = torch.tensor([prompt_ids(tok, conv)])
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, len(prompt_ids(tok, conv)):], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def im(tiny_tokenizer):
    return InferenceModel(tiny_llama(len(tiny_tokenizer), seed=3).eval(), tiny_tokenizer, "tiny")


def test_batched_left_padded_generation_matches_unbatched_greedy(im):
    lengths = [len(prompt_ids(im.tokenizer, c)) for c in PROMPTS]
    assert max(lengths) > 8 * min(lengths)  # very different lengths: the short rows carry long padding
    batched = generate(im, PROMPTS, max_new_tokens=12, batch_size=4)
    with torch.no_grad():
        expected = [one_at_a_time(im.model, im.tokenizer, c, 12) for c in PROMPTS]
    assert batched == expected
    assert generate(im, PROMPTS, max_new_tokens=12, batch_size=1) == expected
    assert len(set(batched)) > 1  # the prompts really lead to different continuations


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("abc\ndef###g", ["###", "\n"]) == "abc"
    assert cut_at_stop("abc###d\ne", ["\n", "###"]) == "abc"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
    assert cut_at_stop("xabc", ["x"]) == ""


def _spy_generate(monkeypatch, im):
    """Record the number of rows of each model.generate call."""
    calls = []
    real = im.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(im.model, "generate", spy)
    return calls


def _tokens_alone(im, conv, n, ended=lambda text: False) -> int:
    """How many tokens one row generates on its own (un-pruned model.generate, greedy): up to and
    with EOS, up to the first token after which ended(text) holds, or n."""
    tok = im.tokenizer
    ids = torch.tensor([prompt_ids(tok, conv)])
    new = im.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return next((i for i in range(1, len(new) + 1)
                 if new[i - 1] == tok.eos_token_id or ended(tok.decode(new[:i], skip_special_tokens=True))), len(new))


def _rows_per_call(lengths: list[int], n: int) -> list[int]:
    """Rows in each PRUNE_EVERY-token call when a row leaves the batch after its last token."""
    return [sum(k > start for k in lengths) for start in range(0, n, PRUNE_EVERY) if max(lengths) > start]


def test_stop_string_cuts_the_reply_and_ends_that_rows_generation(im, monkeypatch):
    free = generate(im, PROMPTS[:2], max_new_tokens=24, batch_size=2)
    reply = free[0]
    assert len(reply) > 6
    stop = reply[3:5]
    k = reply.find(stop)
    lengths = [_tokens_alone(im, c, 24, lambda text: stop in text) for c in PROMPTS[:2]]
    calls = _spy_generate(monkeypatch, im)
    cut = generate(im, PROMPTS[:2], max_new_tokens=24, batch_size=2, stop=[stop])
    assert cut[0] == reply[:k].strip()
    assert cut[1] == cut_at_stop(free[1], [stop]).strip()
    # the row left the batch as soon as its text held the stop string: later calls run without it
    assert lengths[0] < 24 and calls == _rows_per_call(lengths, 24)
    assert calls[-1] < 2  # so the other row did go on alone


def test_stop_when_ends_each_row_where_the_predicate_first_holds(im, monkeypatch):
    def long_enough(text):
        return len(text) >= 12

    free = generate(im, PROMPTS, max_new_tokens=20, batch_size=4)
    lengths = [_tokens_alone(im, c, 20, long_enough) for c in PROMPTS]
    tok = im.tokenizer
    expected = []
    for c, n in zip(PROMPTS, lengths):  # each row alone, un-pruned, generating exactly that many tokens
        ids = torch.tensor([prompt_ids(tok, c)])
        new = im.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        expected.append(tok.decode(new, skip_special_tokens=True).strip())
    calls = _spy_generate(monkeypatch, im)
    cut = generate(im, PROMPTS, max_new_tokens=20, batch_size=4, stop_when=long_enough)
    assert cut == expected
    assert all(f.startswith(r) for f, r in zip(free, cut)) and cut != free
    assert calls == _rows_per_call(lengths, 20) and sum(calls) < 4 * len(calls)  # ended rows left the batch


def test_stop_string_in_the_prompt_does_not_end_the_reply(im):
    # The chat prompt ends with "assistant\n"; a "\n" stop must only look at the generated text.
    free = generate(im, PROMPTS[:1], max_new_tokens=10)[0]
    assert generate(im, PROMPTS[:1], max_new_tokens=10, stop=["\n"]) == [cut_at_stop(free, ["\n"]).strip()]


def test_sampling_is_seeded_reproducible_and_leaves_global_rng_alone(im):
    state = torch.get_rng_state()
    a = generate(im, PROMPTS, max_new_tokens=16, temperature=2.0, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(im, PROMPTS, max_new_tokens=16, temperature=2.0, seed=1) == a
    b = generate(im, PROMPTS, max_new_tokens=16, temperature=2.0, seed=2)
    assert b != a
    assert a != generate(im, PROMPTS, max_new_tokens=16)  # sampled, not greedy


@pytest.mark.slow
def test_embedded_model_batched_greedy_equals_transformers_one_at_a_time(embedded_model):
    """The real model (its tokenizer, template and sdpa attention): batching must not change replies."""
    from tunesmith.generation import load_for_inference

    im = load_for_inference(str(embedded_model.path))
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": LONG}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]]
    batched = generate(im, convs, max_new_tokens=8, batch_size=3)
    tok, expected = im.tokenizer, []
    with torch.no_grad():
        for conv in convs:
            ids = torch.tensor([prompt_ids(tok, conv)])
            gen = im.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            expected.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert batched == expected
    assert len(set(batched)) == 3 and all(batched)
