"""Regenerate README.md's table of planned runs: common model sizes x methods x GPU counts, as
`tunesmith plan` estimates them on H100 80GB GPUs (issue 17, item 6).

    python scripts/plan_table.py           # rewrite the table between the markers in README.md
    python scripts/plan_table.py --print   # print it instead

Each row is the plan of one config: DEFAULTS below, plus model.name (the model's published config.json,
tests/data/model_configs: nothing downloaded, no weights) and method.name. The data is not read
(make_plan(data=False)): every example is assumed data.max_length tokens long.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "model_configs"
README = ROOT / "README.md"
START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"

MODELS = (("1B", "Llama-3.2-1B"), ("3B", "Llama-3.2-3B"), ("8B", "Llama-3.1-8B"), ("70B", "Llama-3.1-70B"))
METHODS = ("lora", "qlora", "full")
GPUS = (1, 8)
DEVICE = "H100 80GB"
# What every row assumes: a common fine-tuning setup (sequences of 2048 tokens, 16 examples per
# optimizer step as 4 x 4 accumulation, activations recomputed in the backward); everything else is
# tunesmith's default (LoRA r=16 alpha 32 on all-linear, AdamW, precision auto = bf16 on H100,
# strategy auto). train.max_steps fixes the run's length (the table shows rates, not durations).
DEFAULTS = {
    "data.max_length": "2048",
    "train.batch_size": "4",
    "train.grad_accum": "4",
    "train.gradient_checkpointing": "true",
    "train.max_steps": "1000",
}


def overrides(model_file: str, method: str) -> list[str]:
    return [f"model.name={CONFIGS / f'{model_file}.json'}", f"method.name={method}",
            *(f"{k}={v}" for k, v in DEFAULTS.items())]


def plan_rows() -> list[tuple[str, str, object]]:
    """(size label, model, Plan) for every model x method x GPU count."""
    from tunesmith.config import load_config
    from tunesmith.plan import devices, report  # module attributes, looked up at call time

    device = devices.parse_device(DEVICE)
    rows = []
    for label, model_file in MODELS:
        for method in METHODS:
            cfg = load_config(None, overrides(model_file, method))
            for gpus in GPUS:
                # no advice: the table shows the plan itself, and advice re-plans every change
                plan = report.make_plan(cfg, device=device, gpus=gpus, data=False, advise=False)
                rows.append((label, model_file, plan))
    return rows


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"  # as Plan.summary writes it


def markdown(rows) -> str:
    """The table, with the assumptions it was made under above it."""
    assumed = ", ".join(f"`{k}={v}`" for k, v in DEFAULTS.items())
    lines = [f"Estimated by `tunesmith plan` for {DEVICE} GPUs; every row: {assumed}, the rest tunesmith's "
             "defaults (LoRA r=16 on all-linear, AdamW, bf16, strategy auto); the data assumed "
             "`data.max_length` tokens an example. Regenerate: `python scripts/plan_table.py`.", "",
             "| model | method | GPUs | trainable params | memory per GPU | fits? | strategy | est. tokens/s |",
             "|---|---|---:|---:|---:|---|---|---:|"]
    for label, model, plan in rows:
        margin = plan.memory.margin
        fits = f"yes ({_gb(margin)} spare)" if plan.fits else f"no (short {_gb(-margin)})"
        lo, mid, hi = plan.time.tokens_per_s
        lines.append(f"| {label} ({model}) | {plan.workload.method} | {plan.gpus} | {plan.counts.trainable:,} | "
                     f"{_gb(plan.memory.total)} | {fits} | {plan.workload.strategy} | "
                     f"{mid:,.0f} ({lo:,.0f}-{hi:,.0f}) |")
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """`text` with what lies between the markers replaced by `table`; everything else byte for byte."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"README must hold {START} then {END}, once each")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the table instead of rewriting the README")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    table = markdown(plan_rows())
    if args.print:
        print(table)
        return 0
    args.readme.write_text(replace_table(args.readme.read_text(encoding="utf-8"), table), encoding="utf-8")
    print(f"wrote {len(table.splitlines()) - 4} rows into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
