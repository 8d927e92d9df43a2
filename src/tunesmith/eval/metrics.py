"""Metrics of generated replies against references: the one module that calls sacrebleu and rouge-score.

Each metric in METRICS maps (predictions, references, context) to corpus values (fractions 0-1,
BLEU and chrF included: sacrebleu's 0-100 divided by 100, so every rate in a TaskResult has the
same scale) and per-example values (the same metric on one example, used as the row's score).
The first corpus value a metric returns is its primary value.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tunesmith.eval.json_fields import json_metrics, parse_json_object

OTHER = "<other>"  # the class of a prediction that is none of the labels
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class Context:
    """What some metrics need beyond the texts."""
    labels: list[str] = field(default_factory=list)          # label tasks: the label set (default: references)
    json_fields: list[str] = field(default_factory=list)     # json: fields scored (default: the first reference's)


@dataclass
class Scores:
    corpus: dict[str, float]                 # metric -> value over all examples
    per_example: dict[str, list[float]]      # metric -> value of each example


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def exact_match(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    per = [float(p.strip() == r.strip()) for p, r in zip(preds, refs)]
    return Scores({"exact_match": _mean(per)}, {"exact_match": per})


def normalized_match(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    per = [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(preds, refs)]
    return Scores({"normalized_match": _mean(per)}, {"normalized_match": per})


def label_index(labels: list[str], refs: list[str]) -> dict[str, str]:
    """normalised form -> label, for the labels given plus any reference not among them."""
    index: dict[str, str] = {}
    for label in [*labels, *refs]:
        index.setdefault(normalize_answer(label), label.strip())
    return index


def to_labels(preds: list[str], refs: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """References and predictions as labels; a prediction that equals no label after
    normalisation becomes OTHER (always wrong)."""
    index = label_index(labels, refs)
    return ([index[normalize_answer(r)] for r in refs],
            [index.get(normalize_answer(p), OTHER) for p in preds])


def macro_f1_of(y_true: list[str], y_pred: list[str]) -> float:
    """Unweighted mean F1 over the labels that occur among the references or the predictions
    (OTHER excluded: it is no class, its predictions only cost recall). A label that occurs in
    neither has no defined F1 and is left out, so a small sample is not scored against all 77
    banking intents."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1
        else:
            fn[t] += 1
            fp[p] += 1
    present = (set(y_true) | set(y_pred)) - {OTHER}
    return _mean([2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in present])


def _label_scores(preds: list[str], refs: list[str], ctx: Context, name: str) -> Scores:
    y_true, y_pred = to_labels(preds, refs, ctx.labels)
    per = [float(t == p) for t, p in zip(y_true, y_pred)]
    value = _mean(per) if name == "accuracy" else macro_f1_of(y_true, y_pred)
    return Scores({name: value}, {name: per})  # per example, macro-F1 has no value of its own: correctness


def accuracy(preds, refs, ctx):
    return _label_scores(preds, refs, ctx, "accuracy")


def macro_f1(preds, refs, ctx):
    return _label_scores(preds, refs, ctx, "macro_f1")


def json_scores(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    """field_accuracy first (the primary: it grades partly right objects, which whole-object
    exact match scores as plain wrong), then json_exact_match and json_valid."""
    objs = [parse_json_object(r) for r in refs]
    bad = next((i for i, o in enumerate(objs) if o is None), None)
    if bad is not None:
        raise ValueError(f"reference {bad} is not a JSON object: {refs[bad][:80]!r}")
    fields = tuple(ctx.json_fields or (list(objs[0]) if objs else []))
    corpus = json_metrics(preds, objs, fields)
    per = [json_metrics([p], [o], fields) for p, o in zip(preds, objs)]
    names = {"field_accuracy": "field_accuracy", "json_exact_match": "exact_match", "json_valid": "json_valid"}
    return Scores({k: corpus[v] for k, v in names.items()}, {k: [e[v] for e in per] for k, v in names.items()})


def rouge_l(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    """Mean ROUGE-L F-measure (rouge-score, no stemming: as HF evaluate's default)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    per = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return Scores({"rouge_l": _mean(per)}, {"rouge_l": per})


def bleu(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing); per example sentence BLEU."""
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(preds, [refs]).score / 100
    per = [sacrebleu.sentence_bleu(p, [r]).score / 100 for p, r in zip(preds, refs)]
    return Scores({"bleu": corpus}, {"bleu": per})


def chrf(preds: list[str], refs: list[str], ctx: Context) -> Scores:
    import sacrebleu

    corpus = sacrebleu.corpus_chrf(preds, [refs]).score / 100
    per = [sacrebleu.sentence_chrf(p, [r]).score / 100 for p, r in zip(preds, refs)]
    return Scores({"chrf": corpus}, {"chrf": per})


METRICS: dict[str, Callable[[list[str], list[str], Context], Scores]] = {
    "exact_match": exact_match, "normalized_match": normalized_match, "accuracy": accuracy,
    "macro_f1": macro_f1, "json": json_scores, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf,
}


def primary_metric(name: str) -> str:
    """The TaskResult metric a config metric name stands for (json -> field_accuracy)."""
    return "field_accuracy" if name == "json" else name


def score(metrics: list[str], preds: list[str], refs: list[str], ctx: Context | None = None) -> Scores:
    """Every metric named, merged (corpus values and per-example values)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    out = Scores({}, {})
    for m in metrics:
        s = METRICS[m](preds, refs, ctx or Context())
        out.corpus.update(s.corpus)
        out.per_example.update(s.per_example)
    return out
