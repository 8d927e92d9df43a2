"""Tokens in a config's training data, counted as training would count them: the same reader, chat
template, tokenizer, truncation at data.max_length and loss mask (data/), on the whole data or on
its first SAMPLE examples scaled to the number of rows. Used by throughput.py; None when the
model's tokenizer is not on this machine or the data file is not (the plan then assumes
max_length tokens per example and says so)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

SAMPLE = 2000  # examples tokenized; more rows are counted and the sample scaled to them


@dataclass(frozen=True)
class DataTokens:
    items: int                    # examples (pairs for paired objectives) in the whole data (scaled if sampled)
    lengths: tuple[int, ...]      # per sampled item: the tokens of every sequence it runs (chosen + rejected)
    widths: tuple[int, ...]       # per sampled item: its longest sequence (what a padded batch pads to)
    trained: int                  # trained tokens in the sample (positions whose hidden state meets the LM head)
    sequences: int                # sequences per item: 2 for pairs, else 1
    source: str                   # "counted (N examples, tokenizer X)" | "estimated from a sample of N of M rows ..."

    @property
    def sample_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def scale(self) -> float:
        """Whole data over the sample."""
        return self.items / max(len(self.lengths), 1)


def model_tokenizer(spec: str):
    """(tokenizer, where) for `model.name` when it is on this machine, else (None, why not)."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import ALIASES, resolve_model

    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_dir():
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return load_tokenizer(path), str(path)
        return None, f"no tokenizer files in {path}"
    if spec in ALIASES or (path.is_file() and path.suffix == ".gguf"):
        return load_tokenizer(resolve_model(spec).path), spec
    from tunesmith.models.families import HUB_ALIASES

    repo = HUB_ALIASES[spec.lower()].repo if spec.lower() in HUB_ALIASES else spec
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "tokenizer_config.json")
        if isinstance(cached, str) and try_to_load_from_cache(repo, "tokenizer.json"):
            return load_tokenizer(Path(cached).parent), f"{repo} (cached)"
    except Exception:  # noqa: BLE001 - a cache we cannot read is a tokenizer we do not have
        pass
    return None, f"the tokenizer of {spec} is not on this machine"


def _sample_examples(cfg) -> tuple[list, int]:
    """(the first SAMPLE examples, rows in the data): a mixture or a tree format (oasst) is loaded
    whole, as training loads it; a plain source is read in full but normalised only for the sample."""
    from tunesmith.data.formats import TREE_FORMATS, detect_format, map_columns, normalise
    from tunesmith.data.sources import iter_records
    from tunesmith.recipes.sft import load_training_examples

    d = cfg.data
    if d.sources:
        ex = load_training_examples(cfg).examples
        return ex[:SAMPLE], len(ex)
    records = iter_records(d.train)
    out, rows = [], 0
    for raw in itertools.islice(records, SAMPLE):
        rows += 1
        if raw.error:
            continue  # training stops or quarantines it; either way it trains nothing
        record = map_columns(raw.record, d.columns or {}, raw.where)
        fmt = detect_format(record, raw.where) if d.format == "auto" else d.format
        if fmt in TREE_FORMATS:
            ex = load_training_examples(cfg).examples
            return ex[:SAMPLE], len(ex)
        try:
            out += normalise(record, fmt, raw.where, None, d.system_prompt)
        except Exception:  # noqa: BLE001 - an invalid row: training refuses or skips it, not ours to judge
            continue
    rows += sum(1 for _ in records)
    return out, rows


def count_tokens(cfg, paired: bool) -> DataTokens | None:
    """DataTokens of cfg's training data (pairs when `paired`), or None when the model's tokenizer or
    the data is not on this machine (the caller then assumes max_length and says so)."""
    from tunesmith.data.sources import expand_source

    specs = [s.path for s in cfg.data.sources] or [cfg.data.train]
    try:
        if not all(expand_source(s) for s in specs):
            return None
    except Exception:  # noqa: BLE001 - missing or unreadable data: the plan assumes max_length
        return None
    tokenizer, where = model_tokenizer(cfg.model.name)
    if tokenizer is None:
        return None
    from tunesmith.data.templates import apply_template
    from tunesmith.data.tokenize import IGNORE, encode_example, encode_preference

    apply_template(tokenizer, cfg.data.template)
    examples, rows = _sample_examples(cfg)
    max_len = cfg.data.max_length
    lengths, widths, trained = [], [], 0
    for ex in examples:
        if paired and ex.kind != "preference" or not paired and ex.kind == "preference":
            continue
        if paired:
            pair = encode_preference(tokenizer, ex, max_len)
            seqs = (pair.chosen, pair.rejected)
        else:
            seqs = (encode_example(tokenizer, ex, max_len, cfg.data.train_on),)
        n_trained = sum(1 for s in seqs for x in s.labels[1:] if x != IGNORE)  # targets: labels shifted by one
        if n_trained == 0:
            continue  # encode_dataset drops it
        lengths.append(sum(len(s.input_ids) for s in seqs))
        widths.append(max(len(s.input_ids) for s in seqs))
        trained += n_trained
    if not lengths:
        return None
    sampled = rows > len(examples) and len(examples) >= SAMPLE
    items = round(len(lengths) * rows / max(len(examples), 1)) if sampled else len(lengths)
    name = getattr(tokenizer, "name_or_path", "") or where
    source = (f"estimated from the first {len(lengths)} examples of {rows} rows, scaled (tokenizer {Path(name).name})"
              if sampled else f"counted ({len(lengths)} {'pairs' if paired else 'examples'}, tokenizer "
              f"{Path(name).name})")
    return DataTokens(items, tuple(lengths), tuple(widths), trained, 2 if paired else 1, source)
