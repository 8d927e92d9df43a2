"""The demo (main job): generate the order->JSON task, evaluate the base model, fine-tune with
LoRA, evaluate the tuned model, print and save the before -> after table."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tunesmith.atomic import atomic_write, write_json
from tunesmith.config import parse_config
from tunesmith.demo.orders import FIELDS, SYSTEM, make_splits, write_splits
from tunesmith.eval.answer_end import json_end
from tunesmith.eval.json_fields import json_metrics
from tunesmith.eval.results import speed_text
from tunesmith.generation import GenerationStats, generate, load_for_inference
from tunesmith.models.registry import DEFAULT_MODEL
from tunesmith.recipes.sft import run_sft
from tunesmith.training.rundir import run_name

METRICS = ("exact_match", "json_valid", "field_accuracy")


def demo_config(model: str, data: dict[str, Path], output_dir: str, name: str, epochs: float) -> dict:
    return {
        "model": {"name": model},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "max_length": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "train": {"epochs": epochs, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "schedule": "cosine",
                  "seed": 0, "eval_every": 10},
        "run": {"name": name, "output_dir": output_dir},
    }


def answer_budget(tokenizer, refs: list[dict], margin: int = 4) -> int:
    """max_new_tokens for these references: the longest one in the most spacious form the metric
    accepts and small models write (indented, in a ```json fence), plus a margin. A reply cut off
    there could not have been that object; the budget follows the task, not a generic limit."""
    def tokens(ref: dict) -> int:
        return len(tokenizer("```json\n" + json.dumps(ref, indent=2) + "\n```", add_special_tokens=False)["input_ids"])

    return max(tokens(r) for r in refs) + margin


def evaluate_json_task(spec, test_rows: list[dict], adapter: bool = True) -> tuple[dict, list[str], dict]:
    """(metrics, replies, speed). All rows in one batch; a reply ends at its answer's end (json_end:
    past its first JSON object, or at once when it opens with prose, which scores nothing) and its
    row leaves the batch: the scores are those of replies generated to the budget and cut there."""
    t0 = time.perf_counter()
    im = load_for_inference(spec, adapter=adapter)
    prompts = [row["messages"][:-1] for row in test_rows]
    refs = [json.loads(row["messages"][-1]["content"]) for row in test_rows]
    stats = GenerationStats()
    preds = generate(im, prompts, max_new_tokens=answer_budget(im.tokenizer, refs), batch_size=len(prompts),
                     end_at=json_end, stats=stats)
    speed = {"examples_per_s": stats.rows / stats.seconds, "tokens_per_s": stats.tokens / stats.seconds,
             "generated_tokens": stats.tokens, "decode_row_steps": stats.row_steps,
             "generation_seconds": round(stats.seconds, 3)}
    print(f"      {len(prompts)} rows in {time.perf_counter() - t0:.0f} s ({speed_text(speed)} generating)", flush=True)
    return json_metrics(preds, refs, FIELDS), preds, speed


def format_table(result: dict) -> str:
    lines = [f"{'metric':<16}{'base':>8}{'tuned':>8}{'change':>9}"]
    for m in METRICS:
        b, t = result["base"][m], result["tuned"][m]
        lines.append(f"{m:<16}{b:>8.1%}{t:>8.1%}{(t - b) * 100:>+8.1f}p")
    speed = result.get("speed", {})
    if speed:
        b, t = speed["base"]["examples_per_s"], speed["tuned"]["examples_per_s"]
        lines.append(f"{'examples/s':<16}{b:>8.2f}{t:>8.2f}")
    return "\n".join(lines)


def run_demo(model: str = DEFAULT_MODEL, output_dir: str = "runs", name: str | None = None,
             train_size: int = 240, test_size: int = 60, epochs: float = 1.0) -> Path:
    t0 = time.perf_counter()
    name = run_name(name, prefix="demo")
    data_dir = Path(output_dir) / f"{name}-data"
    paths = write_splits(data_dir, make_splits(0, {"train": train_size, "validation": 24, "test": test_size}))
    test_rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    cfg = parse_config(demo_config(model, paths, output_dir, name, epochs), "demo")
    print(f"demo: order notes -> JSON, {train_size} train / 24 validation / {test_size} test rows in {data_dir}",
          flush=True)

    print("\n[1/3] evaluating the base model on the test split (a reply ends at the brace closing its "
          "JSON object, or at once when it opens with prose: it scores nothing either way)", flush=True)
    base, base_preds, base_speed = evaluate_json_task(model, test_rows)
    print(f"      base: {base}", flush=True)

    print("\n[2/3] fine-tuning with LoRA", flush=True)
    t1 = time.perf_counter()
    run = run_sft(cfg)
    print(f"      trained in {time.perf_counter() - t1:.0f} s", flush=True)

    print("\n[3/3] evaluating the tuned model on the test split", flush=True)
    tuned, tuned_preds, tuned_speed = evaluate_json_task(run, test_rows)
    result = {"base": base, "tuned": tuned, "speed": {"base": base_speed, "tuned": tuned_speed}}

    eval_dir = run / "eval"
    eval_dir.mkdir(exist_ok=True)
    write_json(eval_dir / "compare.json", result)
    with atomic_write(eval_dir / "predictions.jsonl") as f:
        for row, b, t in zip(test_rows, base_preds, tuned_preds):
            f.write(json.dumps({"note": row["messages"][1]["content"], "expected": row["messages"][-1]["content"],
                                "base": b, "tuned": t}) + "\n")
    print("\n" + format_table(result))
    print(f"\nexample: {test_rows[0]['messages'][1]['content']}\n  base : {base_preds[0][:160]}\n"
          f"  tuned: {tuned_preds[0]}")
    print(f"\nsaved {eval_dir / 'compare.json'}; demo took {time.perf_counter() - t0:.0f} s")
    print(f'try it: tunesmith generate {run} --system "{SYSTEM}" '
          '--prompt "Order for Ana Diaz in Oslo: 2 x mug, color red. Send it express."')
    return run
