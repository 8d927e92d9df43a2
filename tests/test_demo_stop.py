"""Ending a reply once its JSON score is decided (json_reply_decided, the demo's early stop) changes
no score: cut anywhere the rule allows, a reply scores what the whole reply scores."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.demo.orders import FIELDS, make_splits
from tunesmith.demo.run import answer_budget
from tunesmith.eval.json_fields import json_metrics, json_reply_decided, parse_json_object

REF = json.loads(make_splits(0, {"test": 1})["test"][0]["messages"][-1]["content"])


def stopped(reply: str, cuts: list[int] | None = None) -> str:
    """The reply as generate returns it with stop_when=json_reply_decided: the text at the first
    token boundary (`cuts`, every character by default) where the rule holds, stripped."""
    for k in cuts if cuts is not None else range(1, len(reply) + 1):
        if json_reply_decided(reply[:k]):
            return reply[:k].strip()
    return reply.strip()


def assert_same_scores(replies: list[str], cuts: list[list[int]] | None = None) -> None:
    refs = [REF] * len(replies)
    early = [stopped(r, c) for r, c in zip(replies, cuts or [None] * len(replies))]
    assert json_metrics(early, refs, FIELDS) == json_metrics(replies, refs, FIELDS)
    for full, cut in zip(replies, early):
        assert full.strip().startswith(cut)
        # row by row, not only on average: a cut reply is one that scores nothing either way
        if cut != full.strip():
            assert parse_json_object(cut) is None and parse_json_object(full) is None


COMPACT, INDENTED = json.dumps(REF), json.dumps(REF, indent=2)
WRONG = json.dumps({**REF, "quantity": REF["quantity"] + 1})


@pytest.mark.parametrize("reply, decided_at", [
    (COMPACT, None),                                             # the tuned model's reply: never cut
    (COMPACT + "\n", None),
    ("```json\n" + INDENTED + "\n```\n", None),                  # fenced, closed: still valid
    ("```json\n" + INDENTED + "\n```\n\nThis JSON lists the order.", "```json\n" + INDENTED + "\n```\n\nT"),
    (COMPACT + " I hope this helps!", COMPACT + " I"),
    (COMPACT + "\n```", COMPACT + "\n`"),                        # no opening fence: backticks are extra data
    (COMPACT + COMPACT, COMPACT + "{"),                          # a second object
    ("Sure, here is the JSON: " + COMPACT, "S"),                 # prose first: decided at once
    ("JSON:\n" + COMPACT, "J"),
    ("`" + COMPACT, "`{"),                                       # one backtick is no fence
    ("``` json\n" + COMPACT + "\n```", "``` j"),                 # parse_json_object keeps " json": invalid
    ("```jsonl\n" + COMPACT + "\n```", "```jsonl"),
    ('{"customer": {"name": "Ana"', None),                       # cut off by the token limit: never decided
])
def test_where_replies_are_decided(reply, decided_at):
    prefixes = [reply[:k] for k in range(1, len(reply) + 1)]
    first = next((p for p in prefixes if json_reply_decided(p)), None)
    assert first == decided_at
    assert_same_scores([reply])


ANY_TEXT = st.lists(st.sampled_from(list(' \n\t`{}[]":,ajson\u00a0x') + ["json", "```", "\n```", "Sure"]),
                    max_size=8).map("".join)
OBJECTS = st.one_of(st.just(REF), st.just(json.loads(WRONG)), st.dictionaries(
    st.sampled_from(FIELDS), st.one_of(st.integers(0, 12), st.text("ab {}\"`", max_size=4)), max_size=3))


@st.composite
def one_object_then_anything(draw):
    """A reply that is one JSON object (any layout, maybe fenced) followed by anything."""
    obj = json.dumps(draw(OBJECTS), indent=draw(st.sampled_from([None, 2, 4])))
    fence = draw(st.sampled_from(["", "```json\n", "```\n", "```json", "``` json\n", "``"]))
    close = draw(st.sampled_from(["", "\n```", "```", "\n```\n"])) if fence else ""
    reply = draw(st.sampled_from(["", " ", "\n"])) + fence + obj + close + draw(ANY_TEXT)
    # token boundaries: random cut points, as a tokenizer's pieces would give
    cuts = sorted(set(draw(st.lists(st.integers(1, len(reply)), max_size=30)) + [len(reply)]))
    return reply, cuts


@settings(max_examples=400, deadline=None)
@given(st.lists(one_object_then_anything(), min_size=1, max_size=6))
def test_scores_with_and_without_the_early_stop_are_identical(rows):
    assert_same_scores([r for r, _ in rows], [c for _, c in rows])


@settings(max_examples=300, deadline=None)
@given(one_object_then_anything(), ANY_TEXT)
def test_a_decided_reply_stays_decided_and_never_parses(row, more):
    reply, _ = row
    for k in range(1, len(reply) + 1):
        if json_reply_decided(reply[:k]):
            assert json_reply_decided(reply[:k] + more) and json_reply_decided(reply)
            assert parse_json_object(reply[:k] + more) is None
            break


def test_answer_budget_fits_the_longest_reference_in_its_most_spacious_form(tiny_tokenizer):
    refs = [json.loads(r["messages"][-1]["content"]) for r in make_splits(0, {"test": 60})["test"]]

    def n(text):
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = answer_budget(tiny_tokenizer, refs)
    longest = max(n("```json\n" + json.dumps(r, indent=2) + "\n```") for r in refs)
    assert budget == longest + 4
    assert budget > max(n(json.dumps(r)) for r in refs)  # more than the compact answers the tuned model writes


@pytest.mark.slow
def test_embedded_model_scores_equal_with_and_without_the_early_stop(embedded_model):
    """The real base model on demo rows (prose, fenced and unfinished objects): same scores, and
    each stopped reply is the start of the full one."""
    from tunesmith.generation import generate, load_for_inference

    rows = make_splits(0, {"train": 240, "validation": 24, "test": 60})["test"][:12]
    im = load_for_inference(str(embedded_model.path))
    prompts = [r["messages"][:-1] for r in rows]
    refs = [json.loads(r["messages"][-1]["content"]) for r in rows]
    budget = answer_budget(im.tokenizer, refs)
    full = generate(im, prompts, max_new_tokens=budget, batch_size=12)
    early = generate(im, prompts, max_new_tokens=budget, batch_size=12, stop_when=json_reply_decided)
    assert json_metrics(early, refs, FIELDS) == json_metrics(full, refs, FIELDS)
    assert all(f.startswith(e) for f, e in zip(full, early))
    assert sum(len(e) < len(f) for f, e in zip(full, early)) >= 3  # the rule did cut replies short
