"""Exact/near duplicate detection, PII detection and redaction, contamination n-grams."""
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from tunesmith.data import dedup, pii
from tunesmith.data.contamination import EvalIndex, build_index

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si"]
WORDS = ["".join(p) for p in itertools.product(SYLLABLES, repeat=3)]  # 512 made-up words


def sentence(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def one_word_changed(text: str, at: int = 40) -> str:
    w = text.split()
    w[at] = "zzchanged"
    return " ".join(w)


# --- duplicates ------------------------------------------------------------------------------

def test_exact_key_folds_case_and_whitespace_only():
    assert dedup.exact_key("Hello  World\n") == dedup.exact_key("hello world")
    assert dedup.exact_key("Hello World") != dedup.exact_key("Hello, World")
    keys = [dedup.exact_key(t) for t in ["a b", "c", "A  B", "d", "c", "a b"]]
    assert dedup.exact_groups(keys) == [[0, 2, 5], [1, 4]]


def near_setup(texts, threshold=0.85):
    sigs, has_words = dedup.signatures(texts, num_perm=128, shingle_size=3)
    return dedup.near_pairs(sigs, [i for i in range(len(texts)) if has_words[i]], threshold)


def test_planted_near_duplicates_are_found_and_distinct_rows_are_not():
    base = [sentence(i) for i in range(30)]
    texts = base + [one_word_changed(base[3]), one_word_changed(base[17], 10)]
    pairs = near_setup(texts)
    assert {(i, j) for i, j, _ in pairs} == {(3, 30), (17, 31)}
    assert all(s >= 0.85 for *_, s in pairs)


def test_near_duplicate_clusters_join_chains():
    a = sentence(1)
    b, c = one_word_changed(a, 20), one_word_changed(a, 60)
    texts = [sentence(7), a, sentence(8), b, c]
    assert dedup.clusters(near_setup(texts)) == [[1, 3, 4]]


def test_threshold_is_respected():
    a = sentence(1, 40)
    w = a.split()
    half = " ".join(w[:20] + sentence(99, 20).split())  # about a third of the shingles shared
    assert near_setup([a, half], 0.85) == []
    assert near_setup([a, half], 0.2) != []


def test_rows_without_words_are_not_near_duplicates_of_each_other():
    sigs, has_words = dedup.signatures(["...", "!!!", sentence(1)], 64, 3)
    assert has_words.tolist() == [False, False, True]


def test_signatures_are_stable_across_calls():
    """Signatures do not depend on the process (prepare's dedup must be reproducible)."""
    s1, _ = dedup.signatures([sentence(5)], 64, 3)
    s2, _ = dedup.signatures([sentence(6), sentence(5)], 64, 3)
    assert (s1[0] == s2[1]).all()


def one_word_edit(w: list[str], rng: random.Random, kind: str) -> list[str]:
    e, at = list(w), rng.randrange(len(w))
    if kind == "insert":
        e.insert(rng.randrange(len(w) + 1), rng.choice(WORDS))
    elif kind == "delete":
        del e[at]
    else:
        e[at] = rng.choice([x for x in WORDS[:20] if x != w[at]])
    return e


def near_with_edits(texts, threshold=0.85, one_word=True):
    sigs, has_words = dedup.signatures(texts, num_perm=128, shingle_size=3)
    keys = [dedup.edit_keys(dedup.line_words(t)) for t in texts] if one_word else None
    return {(i, j) for i, j, _ in dedup.near_pairs(sigs, [i for i in range(len(texts)) if has_words[i]],
                                                   threshold, keys=keys)}


def test_one_word_edits_in_short_rows_are_found():
    """Rows of 5-30 words beside a copy with one word inserted, deleted or substituted: 3-word
    shingles at Jaccard 0.85 miss most of them (a middle substitution leaves (n-5)/(n+1))."""
    rng = random.Random(0)
    texts, planted = [], set()
    for k in range(300):
        w = sentence(1000 + k, rng.randint(5, 30)).split()
        planted.add((len(texts), len(texts) + 1))
        texts += [" ".join(w), " ".join(one_word_edit(w, rng, ("insert", "delete", "substitute")[k % 3]))]
    before, after = near_with_edits(texts, one_word=False), near_with_edits(texts)
    assert len(before & planted) / len(planted) < 0.5
    assert len(after & planted) / len(planted) >= 0.95
    assert after == planted  # and nothing else: the originals are unrelated


def within_one_word(a: list[str], b: list[str]) -> bool:
    """Reference: equal, one substitution, or one is the other less one word (by enumeration)."""
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long_ = sorted((a, b), key=len)
    return len(long_) == len(short) + 1 and any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def test_one_word_pairs_equal_brute_force():
    """Every pair at most one word apart, and only those, on rows from a 3-word vocabulary (many
    keys collide, deletions of different rows coincide) of 4-8 words, one line each."""
    rng = random.Random(1)
    rows = [[rng.choice("abc") for _ in range(rng.randint(4, 8))] for _ in range(400)]
    keys = [dedup.edit_keys([r]) for r in rows]
    expected = {(i, j) for i, j in itertools.combinations(range(len(rows)), 2)
                if max(len(rows[i]), len(rows[j])) >= dedup.EDIT_MIN_WORDS and within_one_word(rows[i], rows[j])
                or rows[i] == rows[j]}
    assert dedup.one_word_pairs(keys, list(range(len(rows)))) == expected
    assert len(expected) > 500


def test_many_rows_one_slot_apart_form_one_cluster_without_all_pairs():
    texts = [f"please set the colour to {w} now" for w in WORDS[:150]]
    pairs = near_with_edits(texts)
    assert dedup.clusters([(i, j, 1.0) for i, j in pairs]) == [list(range(150))]
    assert len(pairs) == 149  # a star, not 150*149/2 pairs


@pytest.mark.parametrize("a, b", [
    ("how do i top up my card\npending_top_up", "how do i top up my card\ntop_up_reverted"),  # a one-word label
    ("where is my card now", "where is my pin today"),                       # two words apart
    ("cancel my card", "cancel my order"),                                    # under 5 words
])
def test_rows_more_than_one_word_apart_or_short_are_not_near_duplicates(a, b):
    assert near_with_edits([a, b]) == set()


def test_one_word_apart_in_a_long_enough_line_of_a_chat_row():
    q = "how do i know when my card will arrive"
    assert near_with_edits([f"{q}\ncard_arrival", f"{q.replace('know', 'find out')}\ncard_arrival"]) == set()
    assert near_with_edits([f"{q}\ncard_arrival", f"{q.replace('know', 'see')}\ncard_arrival"]) == {(0, 1)}


@pytest.mark.skipif(not (SHARED_DATA / "banking77").is_dir(), reason="needs ../shared/data/banking77")
def test_no_more_false_pairs_on_a_real_intent_set():
    """banking77 as `data prepare` sees it (text, then the category): a pair whose categories
    differ is false. The one-word criterion finds many more pairs, and no more false ones."""
    from tunesmith.data.dataset import load_examples

    texts = [ex.all_text() for ex in load_examples(SHARED_DATA / "banking77" / "train.csv",
                                                   columns={"instruction": "text", "output": "category"}).examples]
    label = [t.rsplit("\n", 1)[-1] for t in texts]
    before, after = near_with_edits(texts, one_word=False), near_with_edits(texts)
    false_before, false_after = ({p for p in ps if label[p[0]] != label[p[1]]} for ps in (before, after))
    assert len(false_after) <= len(false_before) <= 2
    assert len(after) > 10 * len(before) and before <= after


# --- PII ---------------------------------------------------------------------------------------

PLANTED = {
    "email": "maria.lopez+orders@example-mail.com",
    "phone": "+1 (415) 555-0132",
    "credit_card": "4111 1111 1111 1111",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "sk_api_key": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    "github_token": "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----",
    "generic_secret": "Zq81Lm0Pw7Xv",  # the value of api_key=...
}


def planted_text(kind: str) -> str:
    value = PLANTED[kind]
    return f"My api_key = {value} for the service." if kind == "generic_secret" else f"Please use {value} today."


@pytest.mark.parametrize("kind", list(PLANTED))
def test_each_kind_is_found_once_and_redacted(kind):
    text = planted_text(kind)
    assert pii.count_kinds(text) == {kind: 1}
    clean = pii.redact(text)
    assert PLANTED[kind] not in clean
    assert pii.placeholder(kind) in clean
    assert pii.find(clean) == []


def test_all_kinds_are_planted():
    assert set(PLANTED) == set(pii.KINDS)


@pytest.mark.parametrize("number", ["5555 5555 5555 4444", "378282246310005", "6011-1111-1111-1117"])
def test_real_test_card_numbers_are_cards(number):
    assert pii.count_kinds(f"card: {number}") == {"credit_card": 1}


def test_luhn_invalid_number_is_not_a_card():
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    assert pii.count_kinds("card: 4111 1111 1111 1112") == {}
    assert pii.count_kinds("card: 4111111111111112") == {}


@pytest.mark.parametrize("text", [
    "In 2019-2020 she paid $1,234,567.89 for 12345678901234 items.",
    "The profit was 2,000,000-400,000 0=$<<5*400000=2000000>>2,000,000",
    "timestamp 1700000000000 and pi 3.14159265358979323846",
    "Call extension 555-0132 on 2023-01-15.",
    'api_key="YOUR_API_KEY" and secret: ${SECRET_VALUE}',
    "email me @ the office",
])
def test_ordinary_text_is_not_pii(text):
    assert pii.find(text) == []


def test_overlapping_matches_count_once_with_the_specific_kind():
    text = f"api_key={PLANTED['sk_api_key']}"
    assert pii.count_kinds(text) == {"sk_api_key": 1}


def test_snippet_is_redacted_even_when_cut():
    text = "x" * 300 + " write to " + PLANTED["email"] + " now " + "y" * 300
    snip = pii.snippet(text, width=40)
    assert PLANTED["email"] not in snip and "[REDACTED_EMAIL]" in snip


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(list(PLANTED)), st.text(max_size=12)), max_size=8))
def test_redaction_leaves_no_planted_value(parts):
    text = " ".join(planted_text(p) if p in PLANTED else p for p in parts)
    clean = pii.redact(text)
    for p in parts:
        if p in PLANTED:
            assert PLANTED[p] not in clean
    assert pii.find(clean) == []


# --- contamination -----------------------------------------------------------------------------

def test_contamination_finds_the_planted_overlap_only(tmp_path):
    from conftest import write_jsonl

    evals = [sentence(100 + i, 30) for i in range(5)]
    path = write_jsonl(tmp_path / "eval.jsonl", [{"question": q, "answer": "42"} for q in evals])
    index = build_index([path], n=13)
    copied = "Here is a question: " + " ".join(evals[2].split()[5:20]).upper() + " -- answer it."
    assert index.match(copied) == (f"{path}:3", " ".join(evals[2].split()[5:18]))
    assert index.match(" ".join(evals[2].split()[5:17])) is None  # 12 words: below n
    assert all(index.match(sentence(i, 60)) is None for i in range(20))


def test_short_eval_rows_match_whole_and_tiny_ones_are_ignored():
    index = EvalIndex(13)
    index.add("what is the capital city of france today", "e:1")  # 8 words
    index.add("yes", "e:2")
    assert index.match("Q: What is the capital city of France today? A: Paris")[0] == "e:1"
    assert index.match("yes it is") is None
