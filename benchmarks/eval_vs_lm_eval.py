"""tunesmith's multiple-choice evaluator vs lm-evaluation-harness, on the same model and questions.

    python benchmarks/eval_vs_lm_eval.py [--task arc_easy|arc_challenge|hellaswag|two_choice]
        [--shots K] [--limit N | --sample N] [--seed S] [--batch-size B] [--per-choice]

Tasks (one per multiple-choice shape tunesmith reads; data from ../shared/data):
  * arc_easy, arc_challenge: ARC-<Easy|Challenge>-test.jsonl, lm-eval's arc_easy prompt
    ("Question: ...\nAnswer:", choices " <text>"; short context, 4-5 short choices);
  * hellaswag: hellaswag-val/hellaswag_val_full.txt.bz2, lm-eval's hellaswag prompt (a context
    ending mid-sentence, 4 long endings);
  * two_choice: ARC-Easy questions with two choices (the right one and the next), the right one
    first or second by question parity: the PIQA / Winogrande shape (format `choices`).

What is the same for both tools
  * model: the embedded SmolLM2-135M-Instruct, fp32, loaded once and handed to both in memory
    (lm-eval gets it through HFLM(pretrained=model, tokenizer=tok), via tunesmith.eval.harness);
  * prompts: tunesmith builds each question's context (description, `--shots` solved examples
    drawn per question as `tunesmith eval` draws them, the question) and lm-eval reads exactly
    those contexts, zero-shot, from a local JSONL task (doc_to_text: query, doc_to_choice:
    choices, doc_to_target: gold; target delimiter " "), so both score the same token rows
    and their predictions must agree; lm-eval's own shot sampler would draw other shots;
  * batch size 16, the same questions (`--limit N` the first N, `--sample N` a seeded sample).

Printed: both tools' acc and acc_norm, the number of questions where their predictions differ
(acc and acc_norm), the largest per-choice log-likelihood difference, and each tool's wall time
(evaluation only, model loading excluded; tunesmith's includes reading the data file and
drawing shots, lm-eval's its task loading) with the CPU time other processes used meanwhile
(`other CPU`), so a run disturbed by other work is visible rather than silently trusted, after
the machine line (benchmarks/_machine.py: cores, CPU flags, measured fp32 matmul rate).

tunesmith scores each question as one row (its context, then every choice behind a block
attention mask; eval/block_scoring.py), or from a cached context (eval/prefix_scoring.py) where
the model takes no such mask; `--per-choice` feeds each choice whole instead, as lm-eval does.

Last line: `task=<t> shots=<k> tunesmith_acc=<x> lm_eval_acc=<y> differ=<n> speedup=<z>`,
accuracies in percent with 2 decimals, speedup = lm-eval's wall time / tunesmith's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _machine import busy_cpu_seconds, machine_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = {  # name -> (data file, tunesmith format)
    "arc_easy": (DATA / "arc" / "ARC-Easy-test.jsonl", "arc"),
    "arc_challenge": (DATA / "arc" / "ARC-Challenge-test.jsonl", "arc"),
    "hellaswag": (DATA / "hellaswag-val" / "hellaswag_val_full.txt.bz2", "hellaswag"),
    "two_choice": (DATA / "arc" / "ARC-Easy-test.jsonl", "choices"),  # derived below
}


def timed(fn):
    """fn's result, wall seconds, and CPU seconds other processes used meanwhile."""
    b0, m0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    other = max(0.0, (busy_cpu_seconds() - b0) - (time.process_time() - m0))
    return out, seconds, other


def two_choice_file(arc_items, dest: Path) -> Path:
    """ARC questions as two-choice items: the right choice and the next, right one first on even ids."""
    rows = []
    for n, it in enumerate(arc_items):
        pair = [it.choices[it.gold], it.choices[(it.gold + 1) % len(it.choices)]]
        gold = n % 2
        rows.append({"question": it.question, "choices": pair if gold == 0 else pair[::-1], "answer": gold})
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def lm_eval_task(items, contexts, positions, tmp: Path, name: str) -> Path:
    """A local lm-eval task whose documents are tunesmith's contexts: both tools score the same rows."""
    import yaml

    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"doc": p, "query": ctx, "choices": it.choices, "gold": it.gold}) + "\n"
                            for p, it, ctx in zip(positions, items, contexts)))
    config = {"task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "output_type": "multiple_choice",
              "test_split": "test", "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold",
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in ("acc", "acc_norm")],
              "metadata": {"version": 1.0}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="arc_easy")
    ap.add_argument("--shots", type=int, default=0, help="solved examples before each question (e.g. 0 or 5)")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=int, help="the first N questions (default: all)")
    pick.add_argument("--sample", type=int, help="a seeded sample of N questions (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-choice", action="store_true", help="tunesmith without the shared-prefix scoring")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TUNESMITH_HOME", str(ROOT / ".tunesmith-home"))
    from tunesmith.config import EvalTaskSection
    from tunesmith.eval import multiple_choice as mc
    from tunesmith.eval.harness import run_harness
    from tunesmith.eval.mc_formats import load_items
    from tunesmith.generation import load_for_inference
    from tunesmith.models.registry import resolve_model

    path, fmt = TASKS[args.task]
    if not path.is_file():
        sys.exit(f"{path} not found: the shared data folder is needed")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.task == "two_choice":
            path = two_choice_file(load_items(path)[0], tmp / "two_choice.jsonl")
        items = load_items(path, fmt)[0]
        limit, sample = args.limit, args.sample
        positions = mc.sample_positions(len(items), limit, sample, args.seed)
        im = load_for_inference(resolve_model("smollm2-135m-instruct").path)
        print(machine_line(), flush=True)
        which = f"the first {limit}" if limit else f"a seeded sample, seed {args.seed}" if sample else "all"
        print(f"{args.task}: {len(positions)} of {len(items)} questions ({which}), {args.shots}-shot, "
              f"batch {args.batch_size}, {im.label}")

        task = EvalTaskSection(name=args.task, kind="multiple_choice", path=str(path), format=fmt, limit=limit,
                               sample=sample, seed=args.seed, shots=args.shots, batch_size=args.batch_size,
                               shared_prefix=not args.per_choice)
        # first-call costs (thread pools, allocations) for neither tool
        mc.score_requests(im.model, im.tokenizer, [("Question: Warm?\nAnswer:", " up")])
        ours, t_ours, other_ours = timed(lambda: mc.evaluate(im, task))
        # the contexts evaluate built (the same functions, the same seeds), for lm-eval to read
        chosen = [items[p] for p in positions]
        contexts = [mc.build_context(it, mc.draw_shots(it, items, args.shots, args.seed)) for it in chosen]
        gold_prompt = contexts[0] + mc.TARGET_DELIMITER + chosen[0].choices[chosen[0].gold]
        assert ours.settings["example_prompt"] == gold_prompt, "the contexts differ from evaluate's"
        name = f"{args.task}_{args.shots}shot_local"
        yaml_path = lm_eval_task(chosen, contexts, positions, tmp, name)
        results, t_lm, other_lm = timed(lambda: run_harness(im, [str(yaml_path)], None, batch_size=args.batch_size))
    theirs = sorted(results[name].examples, key=lambda r: r["id"])
    assert len(theirs) == len(positions), "lm-eval evaluated other questions"

    mine = ours.examples
    pred = [r["loglikelihoods"].index(max(r["loglikelihoods"])) for r in mine]
    differ = sum(p != t["prediction"] for p, t in zip(pred, theirs))
    differ_norm = sum(m["score_norm"] != t["score_norm"] for m, t in zip(mine, theirs))
    max_diff = max(abs(a - b) for m, t in zip(mine, theirs) for a, b in zip(m["loglikelihoods"], t["loglikelihoods"]))
    lm_metrics = results[name].metrics
    n_choices = sum(len(m["choices"]) for m in mine)
    print(f"{'tool':<10} {'acc':>7} {'acc_norm':>9} {'seconds':>8} {'choices/s':>10} {'other CPU s':>12}")
    for tool, metrics, sec, other in (("tunesmith", ours.metrics, t_ours, other_ours),
                                      ("lm-eval", lm_metrics, t_lm, other_lm)):
        print(f"{tool:<10} {100 * metrics['acc']:>7.2f} {100 * metrics['acc_norm']:>9.2f} {sec:>8.1f} "
              f"{n_choices / sec:>10.1f} {other:>12.1f}")
    print(f"lm-eval acc stderr {100 * lm_metrics['acc_stderr']:.2f} points")
    print(f"questions where the predictions differ: acc {differ}, acc_norm {differ_norm} (of {len(mine)})")
    print(f"max |log-likelihood difference| over {n_choices} choices: {max_diff:.2e}")
    print(f"tunesmith scoring: {ours.settings['scoring']}")
    print(f"task={args.task} shots={args.shots} tunesmith_acc={100 * ours.metrics['acc']:.2f} "
          f"lm_eval_acc={100 * lm_metrics['acc']:.2f} differ={differ} speedup={t_lm / t_ours:.2f}")


if __name__ == "__main__":
    main()
