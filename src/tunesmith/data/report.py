"""Presenting an inspection: terminal summary, JSON, token-length histogram.

matplotlib is called only here (headless Agg backend: inspect runs on servers without a display).
"""
from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_write

LISTED = 5  # examples per finding on the terminal; the JSON has more


def plot_lengths(lengths: list[int], max_length: int, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#4C72B0")
    ax.axvline(max_length, color="#C44E52", linestyle="--", label=f"max_length = {max_length}")
    over = sum(n > max_length for n in lengths) / max(len(lengths), 1)
    ax.set(xlabel="tokens per example (before truncation)", ylabel="examples",
           title=title or f"{len(lengths)} examples, {over:.1%} longer than max_length")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def _where(locations: list[str], total: int) -> str:
    more = f", … (+{total - LISTED})" if total > LISTED else ""
    return ", ".join(locations[:LISTED]) + more


def _records(r: dict) -> list[str]:
    rec = r["records"]
    fmts = ", ".join(f"{f} {n}" for f, n in rec["by_format"].items())
    lines = [f"{r['source']}: {rec['total']} records ({fmts})"]
    if r["invalid"]:
        lines.append(f"invalid rows: {len(r['invalid'])} (skipped)")
        # Loader errors already start with their file:line.
        lines += [f"   {x['error'] if x['error'].startswith(x['where']) else x['where'] + ': ' + x['error']}"
                  for x in r["invalid"][:LISTED]]
    return lines


def _duplicates(r: dict) -> list[str]:
    ex, near = r["exact_duplicates"], r["near_duplicates"]
    lines = [f"exact duplicates: {ex['groups']} groups, {ex['rows']} extra rows"]
    lines += [f"   {g['count']}x  {', '.join(g['locations'][:3])}  \"{g['preview'][:70]}\""
              for g in ex["examples"][:LISTED]]
    lo, hi = near.get("one_word_apart_rows", (None, None))
    apart = f", or one word apart in rows of {lo}-{hi} words" if lo else ""
    lines.append(f"near duplicates (MinHash Jaccard >= {near['threshold']}, {near['shingle_words']}-word shingles"
                 f"{apart}): "
                 f"{near['pairs']} pairs in {near['clusters']} clusters, {near['rows']} extra rows")
    lines += [f"   {g['size']}x  {', '.join(g['locations'][:3])}  (similarity >= {g['min_similarity']})"
              for g in near["examples"][:LISTED]]
    return lines


def _tokens(r: dict) -> list[str]:
    t = r["tokens"]
    if not t["rows"]:
        return ["tokens: no row could be tokenised"]
    p = t["lengths"]
    rows = r["records"]["total"]
    lines = [f"tokens ({r['model']}, max_length {r['max_length']}, train_on {r['train_on']}): "
             + "  ".join(f"{k} {p[k]}" for k in ("p50", "p90", "p95", "p99", "max")),
             f"   truncated: {t['truncated_rows']} rows ({r['truncated_fraction']:.2%})   trained tokens: "
             f"{r['trained_token_fraction']:.1%} of {t['tokens_after_truncation']:,}"]
    for key, label in (("empty_mask_rows", "empty loss mask"), ("missing_eos_rows", "trained span missing EOS")):
        x = r[key]
        where = f" ({_where(x['locations'], x['count'])})" if x["count"] else ""
        lines.append(f"   {label}: {x['count']} rows{where}")
    pref = r["preference"]
    if pref["rows"]:
        c, j = pref["prompt_chosen"], pref["prompt_rejected"]
        lines.append(f"preference: {pref['rows']} rows of {rows}; prompt+chosen p50 {c['p50']} p95 {c['p95']} max "
                     f"{c['max']}; prompt+rejected p50 {j['p50']} p95 {j['p95']} max {j['max']}; "
                     f"{pref['truncated_rows']} pairs truncated")
    return lines


def _pii(r: dict) -> list[str]:
    found = {k: n for k, n in r["pii"].items() if n}
    kinds = ", ".join(f"{k} {n}" for k, n in found.items()) or "none found"
    lines = [f"PII and secrets: {r['pii_rows']['rows']} rows ({kinds})"]
    lines += [f"   {x['where']} {sorted(x['kinds'])}: {x['snippet']}" for x in r["pii_rows"]["examples"][:LISTED]]
    return lines


def _contamination(r: dict) -> list[str]:
    c = r["contaminated_rows"]
    if not c["eval_files"]:
        return ["contamination: no eval files given (--eval FILE)"]
    lines = [f"contamination ({c['n']}-gram overlap with {', '.join(c['eval_files'])}): {c['count']} rows"]
    lines += [f"   {x['where']} ~ {x['eval_row']}: \"{x['overlap'][:80]}\"" for x in c["rows"][:LISTED]]
    return lines


def render_text(report: dict) -> str:
    sections = (_records, _duplicates, _tokens, _pii, _contamination)
    return "\n".join(line for section in sections for line in section(report))
