import json
import random

import pytest

from tunesmith.eval.metrics import OTHER, Context, normalize_answer, score, to_labels


def test_normalisation_is_squad_style():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("card_arrival") == normalize_answer("Card_Arrival.")


def test_exact_and_normalised_match_by_hand():
    preds = ["Paris", " paris ", "The Paris.", "Lyon"]
    refs = ["Paris", "Paris", "Paris", "Paris"]
    s = score(["exact_match", "normalized_match"], preds, refs)
    assert s.per_example["exact_match"] == [1.0, 0.0, 0.0, 0.0]  # strip only: case still counts
    assert s.per_example["normalized_match"] == [1.0, 1.0, 1.0, 0.0]
    assert s.corpus == {"exact_match": 0.25, "normalized_match": 0.75}


def test_labels_map_after_normalisation_and_unknown_predictions_are_other():
    y_true, y_pred = to_labels(["Card Arrival!", "refund", "no idea"], ["card arrival", "refund", "refund"],
                               ["card arrival", "refund", "top up"])
    assert y_true == ["card arrival", "refund", "refund"]
    assert y_pred == ["card arrival", "refund", OTHER]


def test_accuracy_and_macro_f1_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    labels = ["card_arrival", "top_up_failed", "refund_not_showing_up", "lost_card", "unused_label"]
    refs = [rng.choice(labels[:4]) for _ in range(200)]
    noise = ["something else", "Card Arrival", "TOP_UP_FAILED.", "lost card"]
    preds = [r if rng.random() < 0.5 else rng.choice(labels[:4] + noise) for r in refs]
    s = score(["accuracy", "macro_f1"], preds, refs, Context(labels=labels))
    y_true, y_pred = to_labels(preds, refs, labels)
    assert OTHER in y_pred and "unused_label" not in y_true + y_pred
    present = sorted((set(y_true) | set(y_pred)) - {OTHER})
    assert s.corpus["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s.corpus["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro",
                                                          zero_division=0))
    # "TOP_UP_FAILED." normalises to the label, "lost card" (space, not underscore) does not
    assert to_labels(["TOP_UP_FAILED.", "lost card"], ["lost_card"] * 2, labels)[1] == ["top_up_failed", OTHER]


def test_macro_f1_by_hand():
    # a: tp 1, fn 1 -> F1 2/3; b: tp 1, fp 1, fn 1 (the OTHER prediction) -> 1/2; OTHER is no class
    s = score(["macro_f1"], ["a", "b", "b", "zzz"], ["a", "a", "b", "b"])
    assert s.corpus["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.per_example["macro_f1"] == [1, 0, 1, 0]


def test_bleu_chrf_rouge_match_the_libraries():
    import sacrebleu
    from rouge_score.rouge_scorer import RougeScorer

    refs = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "deliver three pink scarves"]
    preds = ["the cat is on the mat", "the quick brown fox jumped over a lazy dog", "three scarves"]
    s = score(["bleu", "chrf", "rouge_l"], preds, refs)
    assert s.corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert s.corpus["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100)
    assert 0 < s.corpus["bleu"] < 1 and 0 < s.corpus["chrf"] < 1
    scorer = RougeScorer(["rougeL"])
    per = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert s.per_example["rouge_l"] == pytest.approx(per)
    assert s.corpus["rouge_l"] == pytest.approx(sum(per) / 3)
    # ROUGE-L by hand for the last pair: LCS "three scarves" = 2, P = 2/2, R = 2/4 -> F = 2/3
    assert per[2] == pytest.approx(2 / 3)
    assert s.per_example["bleu"][0] == pytest.approx(sacrebleu.sentence_bleu(preds[0], [refs[0]]).score / 100)


def test_json_metrics_reuse_field_scoring():
    ref = json.dumps({"city": "Oslo", "item": "mug", "quantity": 2})
    preds = [ref, '```json\n{"city": "Oslo", "item": "cup", "quantity": 2}\n```', "not json",
             '{"city": "Oslo"}']
    s = score(["json"], preds, [ref] * 4)
    assert s.per_example["field_accuracy"] == pytest.approx([1, 2 / 3, 0, 1 / 3])
    assert s.per_example["json_valid"] == [1, 1, 0, 1]
    assert s.per_example["json_exact_match"] == [1, 0, 0, 0]
    assert s.corpus["field_accuracy"] == pytest.approx(6 / 12)
    assert list(s.corpus)[0] == "field_accuracy"  # the primary
    assert score(["json"], preds, [ref] * 4, Context(json_fields=["item"])).corpus["field_accuracy"] == 0.25


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown metrics"):
        score(["blue"], ["a"], ["a"])
    with pytest.raises(ValueError, match="not a JSON object"):
        score(["json"], ["{}"], ["plain"])
