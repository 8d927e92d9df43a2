"""`tunesmith data prepare CONFIG`: one data file -> clean train / validation / test files.

Order matters and is fixed:
  1. load data.train (invalid rows stop the run, or with data.skip_invalid go to quarantine.jsonl);
  2. split with prepare.seed BEFORE any cleaning, so what is removed cannot shift rows between
     splits and the split of a row depends only on the seed and the file;
  3. clean: PII drop, token-length limits, contamination (train only), exact then near
     duplicates. A duplicate cluster keeps its test copy over validation over train, so a test
     row never reappears in train through a (near-)copy;
  4. write every file atomically; prepare_report.json is written last and removed first, so its
     presence means the set of files beside it is complete and consistent.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from tunesmith.atomic import atomic_write, write_json
from tunesmith.config import Config, PrepareSection
from tunesmith.data import dedup, pii
from tunesmith.data.audit import Audit, AuditSettings, Progress, audit
from tunesmith.data.contamination import build_index
from tunesmith.data.dataset import LoadResult, load_examples
from tunesmith.data.records import Example
from tunesmith.errors import ConfigError

SPLITS = ("train", "validation", "test")
KEEP_FIRST = {"test": 0, "validation": 1, "train": 2}  # which copy of a duplicate cluster survives
REPORT = "prepare_report.json"


@dataclass
class Removal:
    reason: str
    detail: dict


def split_rows(n: int, validation_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split of each row, from a seeded shuffle of row indices; rows keep their file order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = math.floor(n * test_fraction + 0.5)
    n_val = math.floor(n * validation_fraction + 0.5)
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    for i in order[n_test:n_test + n_val]:
        split[i] = "validation"
    return split


def _filters(a: Audit, split: list[str], p: PrepareSection) -> dict[int, Removal]:
    """Per-row removals that do not depend on other rows."""
    removed: dict[int, Removal] = {}
    for i in range(len(split)):
        stats, kinds, hit = a.tokens[i], a.pii[i], a.contamination[i]
        if p.pii == "drop" and kinds:
            removed[i] = Removal("pii", {"kinds": dict(Counter(kinds))})
        elif a.errors[i]:
            removed[i] = Removal("unencodable", {"error": pii.redact(a.errors[i])})
        elif stats is not None and p.min_tokens and stats.length < p.min_tokens:
            removed[i] = Removal("too_short", {"tokens": stats.length})
        elif stats is not None and p.max_tokens and stats.length > p.max_tokens:
            removed[i] = Removal("too_long", {"tokens": stats.length})
        elif hit and split[i] == "train":
            removed[i] = Removal("contaminated", {"eval_row": hit[0], "overlap": pii.redact(hit[1])[:200]})
    return removed


def _keep_one(group: list[int], split: list[str]) -> tuple[int, list[int]]:
    keep = min(group, key=lambda i: (KEEP_FIRST[split[i]], i))
    return keep, [i for i in group if i != keep]


def _duplicates(a: Audit, split: list[str], p: PrepareSection, examples: list[Example],
                removed: dict[int, Removal]) -> None:
    if p.dedup == "none":
        return
    alive = [i for i in range(len(split)) if i not in removed]
    for group in dedup.exact_groups([a.keys[i] for i in alive]):
        keep, drop = _keep_one([alive[j] for j in group], split)
        for i in drop:
            removed[i] = Removal("exact_duplicate", {"duplicate_of": examples[keep].location, "kept_in": split[keep]})
    if p.dedup != "near":
        return
    rows = [i for i in alive if i not in removed and a.has_words[i]]
    progress = Progress("near-duplicate search", len(rows)).update
    pairs = dedup.near_pairs(a.signatures, rows, p.near_dup_threshold, progress, a.edit_keys)
    # A cluster is a connected component: a row may reach the kept one through a chain of
    # near-duplicates, so its own similarity to the kept row can sit below the threshold.
    for cluster in dedup.clusters(pairs):
        keep, drop = _keep_one(cluster, split)
        for i in drop:
            removed[i] = Removal("near_duplicate", {
                "duplicate_of": examples[keep].location, "kept_in": split[keep],
                "similarity_to_kept": round(dedup.similarity(a.signatures, i, keep), 3)})


def redact_example(ex: Example) -> Example:
    def msgs(ms):
        return [{**m, "content": pii.redact(m["content"])} for m in ms]

    return replace(ex, text=pii.redact(ex.text), messages=msgs(ex.messages), prompt=msgs(ex.prompt),
                   chosen=msgs(ex.chosen), rejected=msgs(ex.rejected))


def to_record(ex: Example) -> dict:
    """The row in the format the loader reads back: messages, text, or prompt/chosen/rejected."""
    if ex.kind == "text":
        return {"text": ex.text}
    if ex.kind == "preference":
        return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
    return {"messages": ex.messages}


def _write_splits(out: Path, rows: dict[str, list[Example]]) -> dict[str, str]:
    written = {}
    for name in SPLITS:
        path = out / f"{name}.jsonl"
        if not rows[name]:
            path.unlink(missing_ok=True)  # a stale file from an earlier run would not match the report
            continue
        with atomic_write(path) as f:
            for ex in rows[name]:
                f.write(json.dumps(to_record(ex), ensure_ascii=False) + "\n")
        written[name] = str(path)
    return written


def _tokenizer(cfg: Config):
    if not (cfg.prepare.min_tokens or cfg.prepare.max_tokens):
        return None  # lengths are only needed for the length filters
    from tunesmith.data.inspect import load_tokenizer_for

    return load_tokenizer_for(cfg.model.name, cfg.data.template)


def check_config(cfg: Config) -> None:
    p = cfg.prepare
    if cfg.data.sources:
        raise ConfigError("data prepare reads one source (data.train); data.sources mixes several at training "
                          "time: prepare each source with its own config, then list the outputs in data.sources")
    if not cfg.data.train:
        raise ConfigError("data prepare needs data.train: the file (or glob) to split and clean")
    if p.validation_fraction + p.test_fraction >= 1:
        raise ConfigError(f"prepare.validation_fraction + prepare.test_fraction = "
                          f"{p.validation_fraction + p.test_fraction:g} leaves nothing to train on; keep it below 1")
    if p.min_tokens and p.max_tokens and p.min_tokens > p.max_tokens:
        raise ConfigError(f"prepare.min_tokens={p.min_tokens} is above prepare.max_tokens={p.max_tokens}")


def _summary(removed: dict[int, Removal], split: list[str]) -> dict:
    by_split: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for i, r in removed.items():
        by_split[split[i]][r.reason] += 1
    return {"counts": dict(Counter(r.reason for r in removed.values())),
            "by_split": {s: dict(c) for s, c in by_split.items()}}


def _fresh_output(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (REPORT, "quarantine.jsonl"):  # the report goes first: without it the set is incomplete
        (out / stale).unlink(missing_ok=True)
    return out


def _audit(cfg: Config, examples: list[Example]) -> Audit:
    p, d = cfg.prepare, cfg.data
    index = build_index(p.contamination_eval, p.contamination_ngram) if p.contamination_eval else None
    settings = AuditSettings(d.max_length, d.train_on, p.dedup == "near", p.num_perm, p.shingle_words)
    return audit(examples, _tokenizer(cfg), settings, index, p.workers, label=f"auditing {d.train}")


def _report(cfg: Config, load: LoadResult, split: list[str], a: Audit, removed: dict[int, Removal],
            kept: dict[str, list[Example]], files: dict[str, str]) -> dict:
    p, examples = cfg.prepare, load.examples
    redacted = p.pii == "redact"
    return {
        "source": str(cfg.data.train), "output_dir": p.output_dir, "prepare": p.model_dump(mode="json"),
        "records": len(examples), "formats": dict(load.formats.most_common()),
        "invalid": {"count": len(load.invalid),
                    "rows": [{"where": r["where"], "error": pii.redact(r["error"])} for r in load.invalid],
                    "quarantine": str(Path(p.output_dir) / "quarantine.jsonl") if load.invalid else None},
        "split_before_cleaning": {s: split.count(s) for s in SPLITS}, "written": {s: len(kept[s]) for s in SPLITS},
        "removed": {**_summary(removed, split),
                    "rows": [{"where": examples[i].location, "split": split[i], "reason": r.reason, **r.detail}
                             for i, r in sorted(removed.items())]},
        "pii": {"mode": p.pii, "counts": dict(Counter(k for kinds in a.pii for k in kinds)),
                "rows": sum(1 for kinds in a.pii if kinds),
                "rows_redacted": sum(1 for i, kinds in enumerate(a.pii) if kinds and redacted and i not in removed)},
        "files": files,
    }


def prepare(cfg: Config) -> dict:
    """Run the whole preparation; returns the report (also written to output_dir)."""
    check_config(cfg)
    p, d = cfg.prepare, cfg.data
    out = _fresh_output(Path(p.output_dir))
    load = load_examples(d.train, d.format, d.columns, d.system_prompt, d.skip_invalid, out / "quarantine.jsonl")
    split = split_rows(len(load.examples), p.validation_fraction, p.test_fraction, p.seed)
    a = _audit(cfg, load.examples)
    removed = _filters(a, split, p)
    _duplicates(a, split, p, load.examples, removed)
    kept = {s: [redact_example(ex) if p.pii == "redact" and a.pii[i] else ex
                for i, ex in enumerate(load.examples) if split[i] == s and i not in removed] for s in SPLITS}
    report = _report(cfg, load, split, a, removed, kept, _write_splits(out, kept))
    write_json(out / REPORT, report)
    return report


def run_prepare(cfg: Config) -> dict:
    report = prepare(cfg)
    counts = ", ".join(f"{k} {n}" for k, n in report["removed"]["counts"].items()) or "nothing"
    sizes = ", ".join(f"{s} {report['written'][s]}" for s in SPLITS)
    print(f"{report['records']} records -> {sizes}; removed: {counts}", flush=True)
    if report["pii"]["rows"]:
        print(f"PII: {report['pii']['rows']} rows ({report['pii']['mode']})", flush=True)
    print(f"wrote {report['output_dir']}/ ({', '.join(Path(f).name for f in report['files'].values())}, {REPORT})",
          flush=True)
    return report
