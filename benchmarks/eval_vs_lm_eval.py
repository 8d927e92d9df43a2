"""tunesmith's multiple-choice evaluator vs lm-evaluation-harness, on the same model and questions.

    python benchmarks/eval_vs_lm_eval.py [--task arc_easy|arc_challenge] [--limit N | --sample N]
        [--seed S] [--batch-size B] [--per-choice]

What is the same for both tools
  * model: the embedded SmolLM2-135M-Instruct, fp32, loaded once and handed to both in memory
    (lm-eval gets it through HFLM(pretrained=model, tokenizer=tok), via tunesmith.eval.harness);
  * data: ../shared/data/arc/ARC-<Easy|Challenge>-test.jsonl; lm-eval reads it through a local
    task YAML with arc_easy's own prompt ("Question: ...\\nAnswer:", choices " <text>");
  * zero-shot, batch size 16, the same questions (a seeded sample is passed to lm-eval as its
    `samples` document indices).

Default questions: the whole test set (ARC-Easy: 2376 questions, 9501 choices), which takes about
6-7 minutes per tool on this 2-core CPU when nothing else runs (~25-28 choices/s; measured below).
`--limit N` takes the first N questions, `--sample N` a seeded sample of N (seed --seed).

Printed: both tools' acc and acc_norm, the number of questions where their predictions differ
(acc and acc_norm), the largest per-choice log-likelihood difference, and each tool's wall time
(evaluation only, model loading excluded) with the CPU time other processes used meanwhile
(`other CPU`), so a run disturbed by other work is visible rather than silently trusted, after
the machine line (benchmarks/_machine.py: cores, CPU flags, measured fp32 matmul rate).

tunesmith scores each question's context once and its choices from the cached keys/values
(eval/prefix_scoring.py); `--per-choice` feeds each choice whole instead, as lm-eval does, to
compare the two paths.

Last line: `tunesmith_acc=<x> lm_eval_acc=<y> speedup=<z>`, accuracies in percent with 2 decimals,
speedup = lm-eval's wall time / tunesmith's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _machine import busy_cpu_seconds, machine_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "arc"
FILES = {"arc_easy": "ARC-Easy-test.jsonl", "arc_challenge": "ARC-Challenge-test.jsonl"}


def timed(fn):
    """fn's result, wall seconds, and CPU seconds other processes used meanwhile."""
    b0, m0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    other = max(0.0, (busy_cpu_seconds() - b0) - (time.process_time() - m0))
    return out, seconds, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(FILES), default="arc_easy")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=int, help="the first N questions (default: all)")
    pick.add_argument("--sample", type=int, help="a seeded sample of N questions (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-choice", action="store_true", help="tunesmith without the shared-prefix cache")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TUNESMITH_HOME", str(ROOT / ".tunesmith-home"))
    from tunesmith.config import EvalTaskSection
    from tunesmith.eval import multiple_choice as mc
    from tunesmith.eval.harness import local_task_yaml, run_harness
    from tunesmith.eval.mc_formats import load_items
    from tunesmith.generation import load_for_inference
    from tunesmith.models.registry import resolve_model

    path = DATA / FILES[args.task]
    if not path.is_file():
        sys.exit(f"{path} not found: the shared data folder is needed")
    total = len(load_items(path)[0])
    limit, sample = args.limit, args.sample
    positions = mc.sample_positions(total, limit, sample, args.seed)
    im = load_for_inference(resolve_model("smollm2-135m-instruct").path)
    print(machine_line(), flush=True)
    which = f"the first {limit}" if limit else f"a seeded sample, seed {args.seed}" if sample else "all"
    print(f"{args.task}: {len(positions)} of {total} questions ({which}), zero-shot, batch {args.batch_size}, "
          f"{im.label}")

    task = EvalTaskSection(name=args.task, kind="multiple_choice", path=str(path), limit=limit, sample=sample,
                           seed=args.seed, batch_size=args.batch_size, shared_prefix=not args.per_choice)
    ours, t_ours, other_ours = timed(lambda: mc.evaluate(im, task))
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = local_task_yaml(path, Path(tmp) / f"{args.task}_local.yaml", task_name=f"{args.task}_local")
        subset = positions if (limit or sample) else None  # the whole set: lm-eval's ordinary path
        results, t_lm, other_lm = timed(lambda: run_harness(im, [str(yaml_path)], None, batch_size=args.batch_size,
                                                             positions=subset))
    theirs = sorted(results[f"{args.task}_local"].examples, key=lambda r: r["id"])
    assert [r["id"] for r in theirs] == positions, "lm-eval evaluated other questions"

    mine = ours.examples
    pred = [r["loglikelihoods"].index(max(r["loglikelihoods"])) for r in mine]
    differ = sum(p != t["prediction"] for p, t in zip(pred, theirs))
    differ_norm = sum(m["score_norm"] != t["score_norm"] for m, t in zip(mine, theirs))
    max_diff = max(abs(a - b) for m, t in zip(mine, theirs) for a, b in zip(m["loglikelihoods"], t["loglikelihoods"]))
    lm_metrics = results[f"{args.task}_local"].metrics
    n_choices = sum(len(m["choices"]) for m in mine)
    print(f"{'tool':<10} {'acc':>7} {'acc_norm':>9} {'seconds':>8} {'choices/s':>10} {'other CPU s':>12}")
    for name, metrics, sec, other in (("tunesmith", ours.metrics, t_ours, other_ours),
                                      ("lm-eval", lm_metrics, t_lm, other_lm)):
        print(f"{name:<10} {100 * metrics['acc']:>7.2f} {100 * metrics['acc_norm']:>9.2f} {sec:>8.1f} "
              f"{n_choices / sec:>10.1f} {other:>12.1f}")
    print(f"lm-eval acc stderr {100 * lm_metrics['acc_stderr']:.2f} points")
    print(f"questions where the predictions differ: acc {differ}, acc_norm {differ_norm} (of {len(mine)})")
    print(f"max |log-likelihood difference| over {n_choices} choices: {max_diff:.2e}")
    print(f"tunesmith scoring: {ours.settings['scoring']}")
    print(f"tunesmith_acc={100 * ours.metrics['acc']:.2f} lm_eval_acc={100 * lm_metrics['acc']:.2f} "
          f"speedup={t_lm / t_ours:.2f}")


if __name__ == "__main__":
    main()
