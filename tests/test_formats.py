"""Every format normalises to the same shape, and its trained tokens are exactly the assistant
contents plus EOS (text: the document plus EOS; preference: the responses, never the prompt)."""
import json

import pytest

from conftest import SHARED_DATA, build_tokenizer
from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import detect_format, normalise, oasst_conversations, parse_transcript
from tunesmith.data.templates import apply_template
from tunesmith.data.tokenize import IGNORE, encode_example, encode_preference
from tunesmith.errors import DataError

USER, ANSWER, ANSWER2 = "Order 3 red mugs to Oslo.", '{"item": "mug", "quantity": 3}', "Sure thing!"

RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": USER},
                              {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "thanks"},
                              {"role": "assistant", "content": ANSWER2}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER},
                                   {"from": "human", "value": "thanks"}, {"from": "gpt", "value": ANSWER2}]},
    "alpaca": {"instruction": "Extract the order.", "input": USER, "output": ANSWER},
    "self_instruct": {"instruction": "Extract the order.",
                      "instances": [{"input": USER, "output": ANSWER}, {"input": "", "output": ANSWER2}]},
    "prompt_completion": {"prompt": USER, "completion": ANSWER},
}
EXPECTED_ANSWERS = {"messages": [ANSWER, ANSWER2], "sharegpt": [ANSWER, ANSWER2], "alpaca": [ANSWER],
                    "self_instruct": [ANSWER], "prompt_completion": [ANSWER]}


def trained_spans(enc):
    spans, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            cur.append(lab)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.fixture(params=["chatml", "llama-3", "alpaca"])
def tokenizer(request):
    tok = build_tokenizer()
    if request.param == "llama-3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                             "<|eot_id|>"]})
    apply_template(tok, request.param)
    tok.template_name = request.param
    return tok


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_trained_spans_are_assistant_contents_plus_eos(fmt, tokenizer):
    assert detect_format(RECORDS[fmt]) == fmt
    examples = normalise(RECORDS[fmt], "auto", "f.jsonl:1")
    assert all(ex.kind == "chat" and ex.format == fmt for ex in examples)
    spans = trained_spans(encode_example(tokenizer, examples[0], 1024))
    # each span ends with the template's end of turn (alpaca ends a turn with the tokenizer's EOS)
    eot = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "alpaca": tokenizer.eos_token}[tokenizer.template_name]
    assert [s[-1] for s in spans] == [tokenizer.convert_tokens_to_ids(eot)] * len(spans)
    assert [tokenizer.decode(s[:-1]) for s in spans] == EXPECTED_ANSWERS[fmt]
    # and the spans are the tokenizer's own tokens of each answer, not a re-tokenised approximation
    assert [s[:-1] for s in spans] == [tokenizer(a, add_special_tokens=False)["input_ids"]
                                       for a in EXPECTED_ANSWERS[fmt]]


def test_train_on_last_assistant_and_all(tiny_tokenizer):
    (ex,) = normalise(RECORDS["messages"], "auto", "f:1")
    last = trained_spans(encode_example(tiny_tokenizer, ex, 1024, train_on="last_assistant"))
    assert [tiny_tokenizer.decode(s) for s in last] == [ANSWER2 + tiny_tokenizer.eos_token]
    everything = encode_example(tiny_tokenizer, ex, 1024, train_on="all")
    assert everything.labels == everything.input_ids


def test_text_trains_every_token_and_ends_with_eos(tiny_tokenizer):
    (ex,) = normalise({"text": "Paris is the capital of France."}, "auto", "f:1")
    enc = encode_example(tiny_tokenizer, ex, 1024)
    assert ex.kind == "text" and enc.labels == enc.input_ids
    assert tiny_tokenizer.decode(enc.input_ids) == "Paris is the capital of France." + tiny_tokenizer.eos_token


def test_tool_calls_are_kept_as_text(tiny_tokenizer):
    call = [{"type": "function", "function": {"name": "lookup", "arguments": "{\"id\": 7}"}}]
    rec = {"messages": [{"role": "user", "content": "find 7"},
                        {"role": "assistant", "content": None, "tool_calls": call},
                        {"role": "tool", "content": "found"}, {"role": "assistant", "content": "It is found."}]}
    (ex,) = normalise(rec, "auto", "f:1")
    assert json.loads(ex.messages[1]["content"]) == call
    spans = trained_spans(encode_example(tiny_tokenizer, ex, 1024))
    assert tiny_tokenizer.decode(spans[0][:-1]) == ex.messages[1]["content"]


HH = ("\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Go on.\n\nAssistant: ",
      "It is 4.", "It is 5, probably.\n\nMaybe.")


def test_transcript_pairs_split_at_the_shared_prompt(tiny_tokenizer):
    rec = {"chosen": HH[0] + HH[1], "rejected": HH[0] + HH[2]}
    (ex,) = normalise(rec, "auto", "hh.jsonl:1")
    assert ex.kind == "preference"
    assert [m["role"] for m in ex.prompt] == ["user", "assistant", "user"]
    assert ex.chosen == [{"role": "assistant", "content": "It is 4."}]
    assert ex.rejected == [{"role": "assistant", "content": "It is 5, probably.\n\nMaybe."}]
    pair = encode_preference(tiny_tokenizer, ex, 1024)
    n = pair.prompt_length
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    assert all(lab == IGNORE for lab in pair.chosen.labels[:n] + pair.rejected.labels[:n])
    for enc, text in ((pair.chosen, "It is 4."), (pair.rejected, "It is 5, probably.\n\nMaybe.")):
        (span,) = trained_spans(enc)
        assert tiny_tokenizer.decode(span) == text + tiny_tokenizer.eos_token


@pytest.mark.parametrize("rec", [
    {"prompt": USER, "chosen": ANSWER, "rejected": ANSWER2},
    {"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": ANSWER}],
     "rejected": [{"role": "assistant", "content": ANSWER2}]},
    {"chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
     "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER2}]},
])
def test_preference_as_strings_or_message_lists(rec):
    (ex,) = normalise(rec, "auto", "p:1")
    assert ex.prompt == [{"role": "user", "content": USER}]
    assert ex.chosen == [{"role": "assistant", "content": ANSWER}]
    assert ex.rejected == [{"role": "assistant", "content": ANSWER2}]


def test_openai_preference_rows_load_as_the_equivalent_prompt_chosen_rejected_record():
    system = {"role": "system", "content": "Be brief."}
    openai_row = {"input": {"messages": [system, {"role": "user", "content": USER}], "tools": []},
                  "preferred_output": [{"role": "assistant", "content": ANSWER}],
                  "non_preferred_output": [{"role": "assistant", "content": ANSWER2}]}
    plain = {"prompt": [system, {"role": "user", "content": USER}],
             "chosen": [{"role": "assistant", "content": ANSWER}],
             "rejected": [{"role": "assistant", "content": ANSWER2}]}
    assert detect_format(openai_row) == "openai_preference"
    (got,) = normalise(openai_row, "auto", "dpo.jsonl:1")
    (want,) = normalise(plain, "auto", "dpo.jsonl:1")
    assert (got.kind, got.format, want.format) == ("preference", "openai_preference", "preference")
    got.format = want.format
    assert got == want
    for bad, msg in (({**openai_row, "input": [1]}, "'input' must be an object with 'messages'"),
                     ({**openai_row, "non_preferred_output": openai_row["preferred_output"]}, "equals"),
                     ({**openai_row, "preferred_output": [{"role": "user", "content": "x"}]},
                      "assistant messages only")):
        with pytest.raises(DataError, match=msg):
            normalise(bad, "auto", "dpo.jsonl:2")


def test_bad_records_name_the_location_and_problem():
    cases = [
        ({"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}, "chosen equals rejected"),
        ({"chosen": HH[0] + "x", "rejected": HH[0] + "x"}, "chosen equals rejected"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"instruction": "x", "output": 3}, "'output' must be a string"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "from 'alien'"),
        ({"body": "x"}, "cannot tell the format"),
        ({"text": "   "}, "'text' is empty"),
    ]
    for rec, msg in cases:
        with pytest.raises(DataError) as e:
            normalise(rec, "auto", "bad.jsonl:7")
        assert "bad.jsonl:7" in str(e.value) and msg in str(e.value), (rec, str(e.value))
    with pytest.raises(DataError, match="does not fit format 'alpaca'"):
        normalise({"messages": []}, "alpaca", "bad.jsonl:1")


def test_column_mapping():
    (ex,) = normalise({"question": "2+2?", "answer": "4"}, "auto", "g:1",
                      columns={"instruction": "question", "output": "answer"})
    assert ex.format == "alpaca" and ex.messages[-1]["content"] == "4"
    with pytest.raises(DataError, match=r"column\(s\) \['answer'\] named in data.columns are missing"):
        normalise({"question": "2+2?"}, "auto", "g:2", columns={"instruction": "question", "output": "answer"})


def test_named_template_needs_its_tokens():
    tok = build_tokenizer()
    with pytest.raises(DataError, match="needs the special token <\\|eot_id\\|>.*data.template=alpaca"):
        apply_template(tok, "llama-3")
    assert apply_template(build_tokenizer(chat_template=None), None) == "chatml"
    assert apply_template(build_tokenizer(), None) == "tokenizer"


def test_oasst_tree_follows_best_ranked_replies():
    rows = [("f:1", {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q?", "rank": None}),
            ("f:2", {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "worse", "rank": 1}),
            ("f:3", {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "best", "rank": 0}),
            ("f:4", {"message_id": "d", "parent_id": "c", "role": "prompter", "text": "More?", "rank": None}),
            ("f:5", {"message_id": "e", "parent_id": "d", "role": "assistant", "text": "yes", "rank": None}),
            ("f:6", {"message_id": "f", "parent_id": "b", "role": "prompter", "text": "orphan branch"})]
    (ex,) = oasst_conversations(rows)
    assert [m["content"] for m in ex.messages] == ["Q?", "best", "More?", "yes"]
    # every branch: 'b' ends on an unanswered prompt, which is cut back to its last reply
    all_paths = [[m["content"] for m in ex.messages] for ex in oasst_conversations(rows, best_only=False)]
    assert sorted(all_paths) == [["Q?", "best", "More?", "yes"], ["Q?", "worse"]]


def test_parse_transcript_keeps_paragraphs():
    msgs = parse_transcript("\n\nHuman: a\n\nb\n\nAssistant: c", "x")
    assert msgs == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


real = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@real
def test_real_oasst_rebuilds_conversations():
    res = load_examples(SHARED_DATA / "oasst1-en-validation" / "en-validation.jsonl")
    assert set(res.formats) == {"oasst"} and 150 <= len(res.examples) <= 188  # one per tree at most
    for ex in res.examples:
        roles = [m["role"] for m in ex.messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate


@real
def test_real_sharegpt_and_self_instruct():
    res = load_examples(SHARED_DATA / "fastchat" / "dummy_conversation.json")
    assert dict(res.formats) == {"sharegpt": len(res.examples)} and len(res.examples) > 100
    seeds = load_examples(SHARED_DATA / "self-instruct" / "seed_tasks.jsonl")
    assert dict(seeds.formats) == {"self_instruct": len(seeds.examples)} and len(seeds.examples) >= 175
    gsm = load_examples(SHARED_DATA / "gsm8k" / "test.jsonl", columns={"instruction": "question", "output": "answer"})
    assert len(gsm.examples) == 1319 and "####" in gsm.examples[0].messages[-1]["content"]
