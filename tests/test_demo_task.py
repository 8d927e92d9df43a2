import json
import re

from tunesmith.demo.orders import FIELDS, ITEMS, NUMBER_WORDS, make_splits, write_splits
from tunesmith.demo.run import format_table
from tunesmith.eval.json_fields import json_metrics, parse_json_object


def test_splits_are_deterministic_and_disjoint(tmp_path):
    a, b = make_splits(0), make_splits(0)
    assert a == b and make_splits(1) != a
    notes = {k: {r["messages"][1]["content"] for r in v} for k, v in a.items()}
    assert not notes["train"] & notes["test"] and not notes["train"] & notes["validation"]
    assert not notes["validation"] & notes["test"]
    paths = write_splits(tmp_path, a)
    assert [json.loads(x) for x in paths["test"].read_text().splitlines()] == a["test"]


def test_answers_agree_with_their_notes():
    for row in make_splits(5)["train"]:
        note, answer = row["messages"][1]["content"], json.loads(row["messages"][2]["content"])
        assert tuple(answer) == FIELDS
        for f in ("customer", "color", "city"):
            assert answer[f] in note
        assert answer["item"] in note or dict(ITEMS)[answer["item"]] in note
        q = answer["quantity"]
        assert re.search(rf"\b({q}|{NUMBER_WORDS[q]})\b", note)


def test_json_metrics_against_hand_counts():
    refs = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "z"}, {"a": 4, "b": "w"}]
    preds = ['{"a": 1, "b": "x"}',             # exact
             '```json\n{"a": 2, "b": "n"}\n```',  # valid, one field right
             'The order is {"a": 3}',           # not JSON
             '[1, 2]']                          # JSON but not an object
    m = json_metrics(preds, refs, ("a", "b"))
    assert m == {"exact_match": 0.25, "json_valid": 0.5, "field_accuracy": 3 / 8}
    assert parse_json_object('{"a": 1, "b": 2, "extra": 3}') == {"a": 1, "b": 2, "extra": 3}
    assert json_metrics(['{"a": 1, "b": "x", "c": 0}'], refs[:1], ("a", "b"))["exact_match"] == 0.0


def test_before_after_table():
    table = format_table({"base": {"exact_match": 0.0, "json_valid": 0.5, "field_accuracy": 0.25},
                          "tuned": {"exact_match": 0.9, "json_valid": 1.0, "field_accuracy": 0.95}})
    assert "exact_match" in table and "+90.0p" in table and "+70.0p" in table
    table = format_table({"base": {"exact_match": 0.0, "json_valid": 0.5, "field_accuracy": 0.25},
                          "tuned": {"exact_match": 0.9, "json_valid": 1.0, "field_accuracy": 0.95},
                          "speed": {"base": {"examples_per_s": 1.5}, "tuned": {"examples_per_s": 3.25}}})
    assert table.splitlines()[-1].split() == ["examples/s", "1.50", "3.25"]
