"""`tunesmith runs list|show|compare`: reading run directories (never the trainer's objects)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunesmith.atomic import atomic_write
from tunesmith.errors import TunesmithError
from tunesmith.training.logging import read_metrics


def _manifest(run: Path) -> dict:
    path = run / "manifest.json"
    if not path.is_file():
        raise TunesmithError(f"{run} is not a finished run directory (no manifest.json)")
    return json.loads(path.read_text())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def summary(run: Path) -> dict:
    m = _manifest(run)
    return {"name": run.name, "kind": m.get("kind"), "model": m["model"]["id"], "method": m.get("method"),
            "steps": m.get("steps"), "final_loss": m.get("final_loss"), "val_loss": m.get("val_loss"),
            "tokens_per_s": m.get("tokens_per_s"), "finished": m.get("finished")}


def find_runs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def list_runs(root: Path) -> str:
    rows = [summary(r) for r in find_runs(root)]
    if not rows:
        return f"no finished runs under {root}"
    return table(rows, ["name", "kind", "model", "method", "steps", "final_loss", "val_loss", "tokens_per_s",
                        "finished"])


def show_run(run: Path) -> str:
    m = _manifest(run)
    lines = [f"run {run}", table([summary(run)], list(summary(run)))]
    lines += plan_vs_measured(m)
    lines.append(f"data: {json.dumps(m.get('data', {}))}")
    lines.append(f"versions: {json.dumps(m.get('versions', {}))}")
    evals = sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
    for e in evals:
        lines.append(f"eval/{e.name}: {e.read_text().strip()}")
    lines.append("files: " + ", ".join(sorted(p.name for p in run.iterdir())))
    return "\n".join(lines)


def _error(estimated, measured) -> str:
    """(estimated - measured) / measured: positive when the plan over-estimated."""
    if not estimated or not measured:
        return "-"
    return f"{100 * (estimated - measured) / measured:+.0f}%"


def plan_vs_measured(m: dict) -> list[str]:
    """The plan's estimates beside what the run measured, with the error of each."""
    plan, measured = m.get("plan"), m.get("measured") or {}
    if not plan:
        return ["plan vs measured: no plan was made for this run" if "plan" in m else
                "plan vs measured: not recorded (a run from before tunesmith plan)"]
    gb = lambda b: "-" if b is None else f"{b / 2**30:.2f} GB"  # noqa: E731
    rate = lambda r: "-" if r is None else f"{r:,.0f}"  # noqa: E731
    peak = measured.get("peak_memory_bytes")
    rows = [{"": "memory per device", "estimated": gb(plan.get("memory_bytes")), "measured": gb(peak),
             "error": _error(plan.get("memory_bytes"), peak)},
            {"": "tokens/s", "estimated": rate(plan.get("tokens_per_s")), "measured": rate(measured.get("tokens_per_s")),
             "error": _error(plan.get("tokens_per_s"), measured.get("tokens_per_s"))}]
    return [f"plan vs measured (memory measured as {measured.get('peak_memory_source') or 'nothing'}; "
            f"plan for {plan.get('device')}):", *("  " + line for line in table(rows, ["", "estimated", "measured",
                                                                                           "error"]).splitlines())]


def compare_runs(runs: list[Path], plot: Path | None = None) -> str:
    rows = [summary(r) for r in runs]
    configs = [_flat(yaml.safe_load((r / "config.yaml").read_text())) for r in runs]
    differing = sorted(k for k in set().union(*configs) if len({json.dumps(c.get(k)) for c in configs}) > 1
                       and k != "run.name")
    out = [table(rows, list(rows[0]))]
    if differing:
        diff_rows = [{"run": r.name, **{k: c.get(k) for k in differing}} for r, c in zip(runs, configs)]
        out += ["", "config differences:", table(diff_rows, ["run", *differing])]
    if plot is not None:
        _plot_losses(runs, plot)
        out.append(f"\nloss curves: {plot}")
    return "\n".join(out)


def _plot_losses(runs: list[Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        rows = read_metrics(r / "metrics.jsonl")
        pts = [(x["step"], x["loss"]) for x in rows if "loss" in x]
        if pts:
            ax.plot(*zip(*pts), label=r.name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(out_png, "wb") as f:
        fig.savefig(f, dpi=110, format=Path(out_png).suffix.lstrip(".") or "png")
    plt.close(fig)
