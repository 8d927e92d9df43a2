import pytest

from conftest import build_tokenizer, trained_runs
from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import normalise
from tunesmith.data.records import Example
from tunesmith.data.tokenize import encode_conversation, encode_dataset, render
from tunesmith.errors import DataError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Order for Maria Lopez in Oslo: 2 x mug."},
    {"role": "assistant", "content": '{"customer": "Maria Lopez", "quantity": 2}'},
    {"role": "user", "content": "And the city?"},
    {"role": "assistant", "content": " Oslo\n"},
]


def test_mask_is_exactly_each_assistant_turn_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_conversation(tok, CONV, max_length=1024)
    runs = trained_runs(enc)
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.eos_token_id
        assert run[:-1] == tok(answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(run) == answer + tok.eos_token
    # The whole sequence is the chat template's rendering, token for token.
    assert enc.input_ids == tok(render(tok, CONV), add_special_tokens=False)["input_ids"]


def test_template_without_eos_gets_one_trained(tiny_tokenizer):
    no_eos = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = build_tokenizer(no_eos)
    enc = encode_conversation(tok, CONV[1:3], max_length=1024)
    (run,) = trained_runs(enc)
    assert tok.decode(run) == CONV[2]["content"] + tok.eos_token


def test_alpaca_becomes_user_assistant(tiny_tokenizer):
    (ex,) = normalise({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", "f:1")
    assert ex.messages == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    (ex,) = normalise({"instruction": "Hi", "output": "Hello"}, "alpaca", "f:1", system_prompt="S")
    msgs = ex.messages
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    (run,) = trained_runs(encode_conversation(tiny_tokenizer, msgs, 512))
    assert tiny_tokenizer.decode(run) == "Hello" + tiny_tokenizer.eos_token


def test_truncation_keeps_prompt_and_drops_rows_with_nothing_left(tiny_tokenizer, capsys):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    enc = encode_conversation(tiny_tokenizer, long_prompt, max_length=50)
    assert len(enc.input_ids) == 50 and enc.trained_tokens == 0
    short, long_prompt = (Example("chat", "f:1", "messages", messages=m) for m in (short, long_prompt))
    kept = encode_dataset(tiny_tokenizer, [short, short, long_prompt], max_length=50)
    assert len(kept) == 2 and "dropped 1 rows" in capsys.readouterr().out
    with pytest.raises(DataError, match="no trained tokens left"):
        encode_dataset(tiny_tokenizer, [short, long_prompt, long_prompt], max_length=50)


def test_load_examples_detects_format_and_reports_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    res = load_examples(p)
    assert dict(res.formats) == {"alpaca": 2} and len(res.examples) == 2
    p.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                 '{"messages": [{"role": "user", "content": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        load_examples(p)
    p.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: no assistant message"):
        load_examples(p)
    p.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot tell the format"):
        load_examples(p)
    p.write_bytes(b'{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: not UTF-8"):
        load_examples(p)
