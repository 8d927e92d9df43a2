"""`tunesmith data inspect`: what is in a data file before anything trains on it.

Loads the file like training does, audits every row (tokens, duplicates, PII, contamination) and
builds one report: a dict written as JSON, a terminal summary and a token-length histogram. Text
from the data appears in the report only after PII redaction.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data import dedup, pii
from tunesmith.data.audit import Audit, AuditSettings, Progress, audit
from tunesmith.data.contamination import build_index
from tunesmith.data.dataset import LoadResult, load_examples
from tunesmith.errors import DataError
from tunesmith.models.registry import DEFAULT_MODEL

SHOWN = 20  # examples listed per finding; counts always cover every row
PERCENTILES = (50, 90, 95, 99)


@dataclass
class InspectOptions:
    model: str = DEFAULT_MODEL
    max_length: int = 512
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    train_on: str = "all_assistant"
    template: str | None = None
    near_dup_threshold: float = 0.85
    num_perm: int = 128
    shingle_words: int = 3
    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13
    skip_invalid: bool = False
    workers: int = 0


@dataclass
class Inspection:
    report: dict
    lengths: list[int]  # tokens per row before truncation, for the histogram


def load_tokenizer_for(model: str | None, template: str | None):
    from tunesmith.data.templates import apply_template
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model

    tokenizer = load_tokenizer(resolve_model(model).path)
    apply_template(tokenizer, template)
    return tokenizer


def preview(text: str, width: int = 100) -> str:
    flat = " ".join(pii.redact(text).split())
    return flat if len(flat) <= width else flat[:width] + "…"


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    out = {f"p{p}": int(np.percentile(arr, p, method="inverted_cdf")) for p in PERCENTILES}
    return {**out, "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def exact_section(load: LoadResult, a: Audit) -> tuple[dict, list[list[int]]]:
    groups = dedup.exact_groups(a.keys)
    ex = load.examples
    shown = [{"count": len(g), "locations": [ex[i].location for i in g[:5]], "preview": preview(ex[g[0]].all_text())}
             for g in sorted(groups, key=len, reverse=True)[:SHOWN]]
    return {"groups": len(groups), "rows": sum(len(g) - 1 for g in groups), "examples": shown}, groups


def representatives(a: Audit, groups: list[list[int]]) -> list[int]:
    """One row per distinct text: near-duplicate search skips copies already counted as exact."""
    extra = {i for g in groups for i in g[1:]}
    return [i for i in range(len(a.keys)) if i not in extra and a.has_words[i]]


def near_section(load: LoadResult, a: Audit, rows: list[int], opts: InspectOptions) -> dict:
    pairs = [] if a.signatures is None else dedup.near_pairs(a.signatures, rows, opts.near_dup_threshold,
                                                             Progress("near-duplicate search", len(rows)).update,
                                                             a.edit_keys)
    groups = dedup.clusters(pairs)
    cluster_of = {i: n for n, g in enumerate(groups) for i in g}
    weakest = [1.0] * len(groups)  # the lowest similarity of a pair that joined the cluster
    for i, _, sim in pairs:
        weakest[cluster_of[i]] = min(weakest[cluster_of[i]], sim)
    ex = load.examples
    shown = [{"size": len(groups[n]), "locations": [ex[i].location for i in groups[n][:5]],
              "min_similarity": round(weakest[n], 3), "previews": [preview(ex[i].all_text()) for i in groups[n][:2]]}
             for n in sorted(range(len(groups)), key=lambda n: -len(groups[n]))[:SHOWN]]
    return {"threshold": opts.near_dup_threshold, "num_perm": opts.num_perm, "shingle_words": opts.shingle_words,
            "one_word_apart_rows": [dedup.EDIT_MIN_WORDS, dedup.EDIT_MAX_WORDS],
            "pairs": len(pairs), "clusters": len(groups), "rows": sum(len(g) - 1 for g in groups), "examples": shown}


def rows_where(load: LoadResult, flags) -> dict:
    hits = [load.examples[i].location for i, f in enumerate(flags) if f]
    return {"count": len(hits), "locations": hits[:SHOWN]}


def token_section(a: Audit, max_length: int) -> dict:
    stats = [t for t in a.tokens if t is not None]
    kept, trained = sum(t.kept for t in stats), sum(t.trained for t in stats)
    truncated = sum(t.length > max_length for t in stats)
    return {"lengths": percentiles([t.length for t in stats]), "max_length": max_length, "rows": len(stats),
            "truncated_rows": truncated, "tokens_after_truncation": kept, "trained_tokens": trained,
            "truncated_fraction": round(truncated / max(len(stats), 1), 6),
            "trained_token_fraction": round(trained / max(kept, 1), 6)}


def preference_section(a: Audit, load: LoadResult, max_length: int) -> dict:
    rows = [t for t, ex in zip(a.tokens, load.examples) if t is not None and ex.kind == "preference"]
    if not rows:
        return {"rows": 0}
    return {"rows": len(rows), "prompt_chosen": percentiles([t.chosen for t in rows]),
            "prompt_rejected": percentiles([t.rejected for t in rows]),
            "truncated_rows": sum(t.length > max_length for t in rows)}


def pii_section(load: LoadResult, a: Audit) -> tuple[dict, dict]:
    counts = Counter(k for kinds in a.pii for k in kinds)
    hits = [i for i, kinds in enumerate(a.pii) if kinds]
    shown = [{"where": load.examples[i].location, "kinds": dict(Counter(a.pii[i])),
              "snippet": pii.snippet(load.examples[i].all_text())} for i in hits[:SHOWN]]
    return {k: counts.get(k, 0) for k in pii.KINDS}, {"rows": len(hits), "examples": shown}


def contamination_section(load: LoadResult, a: Audit, opts: InspectOptions) -> dict:
    hits = [(load.examples[i].location, m) for i, m in enumerate(a.contamination) if m]
    return {"count": len(hits), "n": opts.ngram, "eval_files": list(opts.eval_files),
            "rows": [{"where": w, "eval_row": e, "overlap": preview(words, 200)} for w, (e, words) in hits[:SHOWN * 5]]}


def tokenize_failures(load: LoadResult, a: Audit, skip_invalid: bool) -> list[dict]:
    """Rows the chat template cannot encode: like invalid rows, they stop the run unless skipped."""
    failures = [{"where": load.examples[i].location, "error": pii.redact(e)} for i, e in enumerate(a.errors) if e]
    if failures and not skip_invalid:
        raise DataError(f"{failures[0]['error']} (pass --skip-invalid to list every such row and go on)")
    return failures


def build_report(path: str, load: LoadResult, a: Audit, opts: InspectOptions) -> dict:
    exact, groups = exact_section(load, a)
    tokens = token_section(a, opts.max_length)
    pii_counts, pii_detail = pii_section(load, a)
    return {
        "source": str(path), "model": opts.model, "max_length": opts.max_length, "train_on": opts.train_on,
        "records": {"total": len(load.examples), "by_format": dict(load.formats.most_common()),
                    "by_kind": dict(Counter(ex.kind for ex in load.examples))},
        "invalid": [{"where": r["where"], "error": pii.redact(r["error"])} for r in load.invalid]
                   + tokenize_failures(load, a, opts.skip_invalid),
        "exact_duplicates": exact,
        "near_duplicates": near_section(load, a, representatives(a, groups), opts),
        "tokens": tokens,
        "truncated_fraction": tokens["truncated_fraction"],
        "trained_token_fraction": tokens["trained_token_fraction"],
        "empty_mask_rows": rows_where(load, [t is not None and t.empty_mask for t in a.tokens]),
        "missing_eos_rows": rows_where(load, [t is not None and t.missing_eos for t in a.tokens]),
        "preference": preference_section(a, load, opts.max_length),
        "pii": pii_counts, "pii_rows": pii_detail,
        "contaminated_rows": contamination_section(load, a, opts),
    }


def inspect_file(path: str, opts: InspectOptions, quarantine: str | None = None) -> Inspection:
    load = load_examples(path, opts.format, opts.columns, None, opts.skip_invalid, quarantine or os.devnull)
    index = build_index(opts.eval_files, opts.ngram) if opts.eval_files else None
    tokenizer = load_tokenizer_for(opts.model, opts.template)
    settings = AuditSettings(opts.max_length, opts.train_on, True, opts.num_perm, opts.shingle_words)
    a = audit(load.examples, tokenizer, settings, index, opts.workers, label=f"auditing {path}")
    lengths = [t.length for t in a.tokens if t is not None]
    return Inspection(build_report(path, load, a, opts), lengths)


def parse_columns(items: list[str]) -> dict[str, str]:
    """['instruction=question', ...] -> {'instruction': 'question', ...}"""
    out = {}
    for item in items:
        canon, sep, column = item.partition("=")
        if not (sep and canon and column):
            raise DataError(f"--columns '{item}' must look like field=column, e.g. instruction=question")
        out[canon] = column
    return out


def run_inspect(path: str, opts: InspectOptions, json_out: str | None = None,
                plot_out: str | None = None) -> Inspection:
    from tunesmith.atomic import write_json
    from tunesmith.data.report import plot_lengths, render_text

    result = inspect_file(path, opts)
    print(render_text(result.report), flush=True)
    if json_out:
        write_json(json_out, result.report)
        print(f"wrote {json_out}")
    if plot_out:
        plot_lengths(result.lengths, opts.max_length, plot_out)
        print(f"wrote {plot_out}")
    return result
