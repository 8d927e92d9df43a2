"""Presenting a comparison: the terminal table, and one self-contained HTML file (plots embedded as
base64 PNG, metric and gate tables, the forgetting verdict, the examples where the models disagree).

matplotlib is called only here (headless Agg backend). Every piece of model or data text goes
through html.escape: predictions are untrusted strings.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from tunesmith.eval.compare import Comparison, MetricDelta, TaskComparison, number
from tunesmith.eval.results import higher_is_better, speed_text
from tunesmith.runs import table

DIFFS_PER_TASK = 25
CHANGE_CLASS = {"improved": "pos", "regressed": "neg"}

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#11772d}.neg{color:#b3261e}tr.primary td{font-weight:600}tr.forgetting td{background:#fde2e0}
.verdict{padding:.8em 1em;border-radius:6px;margin:1em 0;font-weight:600}
.bad{background:#fde2e0;border:1px solid #b3261e}.good{background:#e3f4e6;border:1px solid #11772d}
pre{white-space:pre-wrap;word-break:break-word;margin:0;max-height:16em;overflow:auto;font-size:.85em}
img{max-width:100%}
"""


# ---- terminal table ------------------------------------------------------------------------------

def is_rate(d: MetricDelta, value) -> bool:
    """Shown in percent: what the delta treats as a rate (or, with one side missing, looks like one)."""
    v = number(value)
    return d.unit == "pp" or (d.unit == "" and v is not None and higher_is_better(d.metric) and 0 <= v <= 1)


def format_value(d: MetricDelta, value) -> str:
    v = number(value)
    if v is None:
        return "-"
    return f"{v * 100:.1f}%" if is_rate(d, v) else f"{v:.4g}"


def format_delta(d: MetricDelta) -> str:
    return "-" if d.delta is None else f"{d.delta:+.2f} {d.unit}"


def table_rows(c: Comparison) -> list[dict]:
    gates = {g.gate: g for g in c.gates}
    rows = []
    for t in c.tasks:
        for d in t.deltas:
            flags = []
            if d.metric == t.primary:
                flags.append("primary")
                if t.forgetting:
                    flags.append(f"FORGETTING (drop > {c.threshold:g})")
            g = gates.get(f"{t.task}/{d.metric}")
            if g is not None:
                flags.append(f"gate >= {g.minimum:+g}: {'pass' if g.passed else 'FAIL'}")
            rows.append({"task": t.task, "metric": d.metric, "base": format_value(d, d.base),
                         "tuned": format_value(d, d.tuned), "delta": format_delta(d), "flags": ", ".join(flags)})
    return rows


def format_table(c: Comparison) -> str:
    lines = [f"base: {c.base}\ntuned: {c.tuned}", table(table_rows(c), ["task", "metric", "base", "tuned", "delta",
                                                                      "flags"])]
    for t in c.tasks:
        speeds = {side: speed_text(t.speed.get(side, {})) for side in ("base", "tuned")}
        if any(speeds.values()):
            lines.append(f"{t.task} speed: base {speeds['base'] or '-'}; tuned {speeds['tuned'] or '-'}")
    for t in c.tasks:
        n = t.counts
        if not n["paired"] + n["only_base"] + n["only_tuned"]:
            continue  # no per-example rows (e.g. a text file's perplexity windows without predictions)
        lines.append(f"{t.task}: {n['paired']} paired examples, {n['improved']} improved, {n['regressed']} regressed, "
                     f"{n['changed']} changed" + (f", {n['only_base'] + n['only_tuned']} unpaired"
                                                 if n['only_base'] + n['only_tuned'] else ""))
    verdict = (f"FORGETTING on {', '.join(c.forgetting)} (general task dropped more than {c.threshold:g} points)"
               if c.forgetting else "no forgetting flagged")
    lines.append(verdict)
    if c.gates:
        failed = [g.gate for g in c.gates if not g.passed]
        lines.append(f"gates: {'FAILED ' + ', '.join(failed) if failed else 'all ' + str(len(c.gates)) + ' passed'}")
    return "\n".join(lines)


# ---- HTML ----------------------------------------------------------------------------------------

def _esc(value) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, indent=1, ensure_ascii=False)
    return html.escape(text)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scaled(d: MetricDelta, value) -> float:
    """Rates plotted in percent, like the tables show them."""
    return float(value) * 100 if is_rate(d, value) else float(value)


def plot_primary(c: Comparison) -> str:
    """Base vs tuned on each task's primary metric: one small panel per task (their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in c.tasks if t.delta(t.primary) and t.delta(t.primary).delta is not None]
    cols = max(1, min(len(tasks), 4))
    rows = max(1, -(-len(tasks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, t in zip(axes.flat, tasks):
        d = t.delta(t.primary)
        vals = [_scaled(d, d.base), _scaled(d, d.tuned)]
        bars = ax.bar(["base", "tuned"], vals, color=["#8a94a6", "#2f6fdf"])
        ax.bar_label(bars, labels=[format_value(d, d.base), format_value(d, d.tuned)], fontsize=8)
        ax.set_title(f"{t.task}\n{t.primary}" + (" (lower is better)" if not higher_is_better(t.primary) else ""),
                     fontsize=9, color="#b3261e" if t.forgetting else "black")
        ax.margins(y=0.2)
    return _png(fig)


def plot_deltas(c: Comparison) -> str:
    """Each task's primary delta (improvement positive), the forgetting threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(t, t.delta(t.primary)) for t in c.tasks]
    items = [(t, d) for t, d in items if d is not None and d.delta is not None]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.5))
    labels = [f"{t.task}/{d.metric}" for t, d in items]
    values = [d.delta for _, d in items]
    bars = ax.barh(labels, values, color=["#11772d" if v >= 0 else "#b3261e" for v in values])
    ax.bar_label(bars, labels=[format_delta(d) for _, d in items], fontsize=8, padding=3)
    ax.axvline(0, color="black", lw=0.8)
    if any(t.role == "general" for t, _ in items):
        ax.axvline(-c.threshold, color="#b3261e", ls="--", lw=0.8, label=f"forgetting threshold -{c.threshold:g}")
        ax.legend(fontsize=8, loc="best")
    ax.invert_yaxis()
    ax.set_xlabel("improvement of tuned over base (points; pp for rates, % for others)")
    ax.margins(x=0.25)
    return _png(fig)


def _metrics_table(c: Comparison) -> str:
    rows = []
    for t in c.tasks:
        for d in t.deltas:
            cls = " ".join(x for x in ("primary" if d.metric == t.primary else "",
                                       "forgetting" if t.forgetting and d.metric == t.primary else "") if x)
            sign = "" if d.delta is None or d.delta == 0 else ("pos" if d.delta > 0 else "neg")
            rows.append(f'<tr class="{cls}"><td>{_esc(t.task)}</td><td>{_esc(t.role)}</td><td>{_esc(d.metric)}</td>'
                        f'<td class="num">{format_value(d, d.base)}</td>'
                        f'<td class="num">{format_value(d, d.tuned)}</td>'
                        f'<td class="num {sign}">{_esc(format_delta(d))}</td></tr>')
    return ("<table><tr><th>task</th><th>role</th><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>"
            + "".join(rows) + "</table>")


def _verdict(c: Comparison) -> str:
    if c.forgetting:
        text = (f"Forgetting flagged on {_esc(', '.join(c.forgetting))}: a general task's primary metric dropped "
                f"by more than {c.threshold:g} points.")
        return f'<div class="verdict bad" id="forgetting">{text}</div>'
    general = [t.task for t in c.tasks if t.role == "general"]
    text = (f"No forgetting: no general task dropped by more than {c.threshold:g} points."
            if general else "No general tasks (role: general) were compared, so forgetting was not checked.")
    return f'<div class="verdict good" id="forgetting">{text}</div>'


def _gates(c: Comparison) -> str:
    if not c.gates:
        return "<p>No gates were set (eval.gates or --gate TASK/METRIC=MIN).</p>"
    rows = "".join(f'<tr><td>{_esc(g.gate)}</td><td class="num">{g.minimum:+g}</td>'
                   f'<td class="num">{"-" if g.delta is None else f"{g.delta:+.2f} {_esc(g.unit)}"}</td>'
                   f'<td class="{"pos" if g.passed else "neg"}">{"pass" if g.passed else "FAIL"}</td></tr>'
                   for g in c.gates)
    cls = "good" if c.gates_passed else "bad"
    head = f'<div class="verdict {cls}">{"All gates passed" if c.gates_passed else "A gate failed"}</div>'
    return f"{head}<table><tr><th>gate</th><th>least change</th><th>change</th><th>result</th></tr>{rows}</table>"


def _diffs(t: TaskComparison, cap: int) -> str:
    n = t.counts
    if not n["paired"] + n["only_base"] + n["only_tuned"]:
        return f"<h3>{_esc(t.task)}</h3><p>No per-example rows to compare.</p>"
    head = (f"<h3>{_esc(t.task)}</h3><p>{n['paired']} paired examples: {n['improved']} improved, "
            f"{n['regressed']} regressed, {n['changed']} changed (prediction differs, same score)"
            + (f"; {n['only_base']} only in base, {n['only_tuned']} only in tuned" if n['only_base'] + n['only_tuned']
               else "") + ".</p>")
    if not t.diffs:
        return head
    rows = "".join(
        f'<tr><td>{_esc(str(d["id"]))}</td><td class="{CHANGE_CLASS.get(d["change"], "")}">'
        f'{d["change"]}</td><td><pre>{_esc(d["input"])}</pre></td><td><pre>{_esc(d["reference"])}</pre></td>'
        f'<td><pre>{_esc(d["base"])}</pre></td><td><pre>{_esc(d["tuned"])}</pre></td></tr>'
        for d in t.diffs[:cap])
    more = len(t.diffs) - cap
    tail = f"<p>… and {more} more (all of them in compare.json).</p>" if more > 0 else ""
    return (f"{head}<table><tr><th>id</th><th>change</th><th>input</th><th>reference</th><th>base prediction</th>"
            f"<th>tuned prediction</th></tr>{rows}</table>{tail}")


def render_html(c: Comparison, cap: int = DIFFS_PER_TASK) -> str:
    title = f"tunesmith compare: {c.tuned} vs {c.base}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{_esc(title)}</h1>",
        f"<p>base: <code>{_esc(c.base)}</code><br>tuned: <code>{_esc(c.tuned)}</code></p>",
        "<p>Deltas are improvements of tuned over base: percentage points (pp) for rates, percent of the base "
        "value for other metrics, with the sign flipped for lower-is-better ones (perplexity, loss).</p>",
        _verdict(c), "<h2>Primary metrics</h2>",
        f'<img alt="base vs tuned per task" src="data:image/png;base64,{plot_primary(c)}">',
        f'<img alt="deltas per task" src="data:image/png;base64,{plot_deltas(c)}">',
        "<h2>Metrics</h2>", _metrics_table(c), "<h2>Gates</h2>", _gates(c),
        "<h2>Examples where the models disagree</h2>", *(_diffs(t, cap) for t in c.tasks),
        "</body></html>"])


def write_html(comparison: Comparison, path: str | Path, cap: int = DIFFS_PER_TASK) -> Path:
    """Render fully, then write atomically: an error leaves no file, never a half-written one."""
    from tunesmith.atomic import write_text

    return write_text(path, render_html(comparison, cap))
