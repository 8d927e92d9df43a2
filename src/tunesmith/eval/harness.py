"""lm-evaluation-harness on a tunesmith model: the one module that imports lm_eval.

`run_harness` hands the in-memory model and tokenizer (a run's base + adapter, or any model spec)
to lm-eval's HFLM, so what lm-eval scores is exactly what `tunesmith eval` scores, and turns
lm-eval's results into TaskResults (kind "harness") written to out_dir/<task>.json.

Tasks are lm-eval task names (arc_easy, hellaswag ...) or local task YAML files / directories of
them. Named tasks download their data from the Hugging Face Hub; offline that fails, and the
error says to write a local YAML instead: `local_task_yaml` writes one for an ARC-style JSONL
file with lm-eval's own arc_easy prompt (dataset_path: json, data_files).
"""
from __future__ import annotations

import time
from pathlib import Path

from tunesmith.atomic import write_text
from tunesmith.errors import TunesmithError
from tunesmith.eval.results import TaskResult, write_result

ARC_PROMPT = "Question: {{question}}\nAnswer:"  # lm_eval/tasks/arc/arc_easy.yaml


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TunesmithError("the lm-eval harness is not installed; pip install 'tunesmith[eval]' "
                             "(lm-eval>=0.4.8,<0.5)") from None
    return lm_eval


def local_task_yaml(data_file: str | Path, out_path: str | Path, task_name: str = "arc_local") -> Path:
    """A custom lm-eval task YAML for an ARC-style JSONL file (question, choices{text,label},
    answerKey), prompted as lm-eval's arc_easy; shots, if asked, come from the same file."""
    import yaml

    data_file, out_path = Path(data_file).resolve(), Path(out_path)
    if not data_file.is_file():
        raise TunesmithError(f"data file not found: {data_file}")
    config = {
        "task": task_name, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": ARC_PROMPT, "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "should_decontaminate": True, "doc_to_decontamination_query": ARC_PROMPT,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    return write_text(out_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _split_specs(tasks: list[str]) -> tuple[list[str], list[str], bool]:
    """(specs for TaskManager.load, directories to index, whether lm-eval's own tasks are needed).
    A directory stands for every task defined in it."""
    specs, dirs, named = [], [], False
    for t in tasks:
        p = Path(t)
        if p.is_dir():
            dirs.append(str(p.resolve()))
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise TunesmithError(f"task file not found: {t}")
            specs.append(str(p.resolve()))
        else:
            specs.append(t)
            named = True
    return specs, dirs, named


OFFLINE_HINT = ("lm-eval task {name!r} could not load its data ({why}). Named lm-eval tasks download their "
                "datasets from the Hugging Face Hub, which is not reachable here. Point --harness at a local "
                "task YAML with `dataset_path: json` and `dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}}` "
                "(tunesmith.eval.harness.local_task_yaml writes one for ARC-style JSONL).")


def _load_tasks(tasks: list[str]) -> tuple[list, object]:
    """(lm-eval Task objects, the TaskManager that built them)."""
    from lm_eval.tasks import TaskManager

    specs, dirs, named = _split_specs(tasks)
    # Indexing lm-eval's thousands of bundled YAMLs takes seconds; skip it when only local files are asked.
    manager = TaskManager(include_path=dirs or None, include_defaults=named)
    if dirs:
        local = TaskManager(include_path=dirs, include_defaults=False)
        specs += [name for name in local.all_subtasks]
    loaded = []
    for spec in specs:
        try:
            loaded += list(manager.load([spec])["tasks"].values())
        except KeyError as exc:
            raise TunesmithError(f"unknown lm-eval task {spec!r} ({exc}); use a name from `lm-eval ls tasks` "
                                 "or a path to a task YAML file or directory") from None
        except Exception as exc:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
            why = f"{type(exc).__name__}: {exc}"[:300]
            if Path(spec).is_file():
                raise TunesmithError(f"lm-eval could not load the task in {spec} ({why}); if its dataset_path "
                                     "names a Hub dataset, use `dataset_path: json` with local data_files") from None
            raise TunesmithError(OFFLINE_HINT.format(name=spec, why=why)) from None
    if not loaded:
        raise TunesmithError(f"no lm-eval tasks found in {tasks}")
    return loaded, manager


def _metrics(task_results: dict) -> dict[str, float]:
    """lm-eval keys 'acc,none' / 'acc_stderr,none' -> 'acc' / 'acc_stderr' (other filters keep
    their name: 'exact_match/strict-match')."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return out


def _example(sample: dict) -> dict:
    resps = sample.get("filtered_resps") or []
    lls = [r[0] for r in resps if isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float))]
    row = {"id": sample.get("doc_id"), "input": sample["arguments"][0][0] if sample.get("arguments") else None,
           "reference": sample.get("target")}
    if lls and len(lls) == len(resps):  # a multiple-choice task: one log-likelihood per choice
        row["prediction"] = max(range(len(lls)), key=lambda i: (lls[i], -i))
        row["loglikelihoods"] = lls
    else:
        row["prediction"] = resps[0] if resps else None
    for key in ("acc", "exact_match"):
        if key in sample:
            row["score"] = float(sample[key])
            break
    if "acc_norm" in sample:
        row["score_norm"] = float(sample["acc_norm"])
    return row


def _to_result(name: str, out: dict, label: str, settings: dict, seconds: float) -> TaskResult:
    metrics = _metrics(out["results"].get(name, {}))
    primary = "acc" if "acc" in metrics else next((m for m in metrics if "stderr" not in m), "")
    samples = out.get("samples", {}).get(name, [])
    n = out.get("n-samples", {}).get(name, {}).get("effective", len(samples))
    return TaskResult(task=name, kind="harness", model=label, metrics=metrics, primary=primary, n=int(n),
                      examples=[_example(s) for s in samples],
                      settings={**settings, "n_shot": out.get("n-shot", {}).get(name)}, seconds=seconds)


def _device_of(model) -> str:
    return str(next(model.parameters()).device)


def run_harness(spec_or_im, tasks: list[str], out_dir: str | Path | None, limit: int | None = None,
                batch_size: int = 16, num_fewshot: int | None = None, log_samples: bool = True,
                seed: int = 0, positions: list[int] | None = None) -> dict[str, TaskResult]:
    """Evaluate a run directory / model spec (or a loaded InferenceModel) on lm-eval tasks; each
    task's TaskResult is written to out_dir/<task>.json (when out_dir is given). `positions`
    (instead of `limit`) evaluates only those documents of every task, e.g. a seeded sample."""
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from tunesmith.generation import InferenceModel, load_for_inference

    im = spec_or_im if isinstance(spec_or_im, InferenceModel) else load_for_inference(spec_or_im)
    started = time.perf_counter()
    task_objs, manager = _load_tasks(list(tasks))
    lm = HFLM(pretrained=im.model, tokenizer=im.tokenizer, batch_size=batch_size, device=_device_of(im.model))
    samples = {t.task_name: list(positions) for t in task_objs} if positions is not None else None
    was_training = im.model.training
    im.model.eval()
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=task_objs, limit=limit, samples=samples, num_fewshot=num_fewshot, log_samples=log_samples,
            random_seed=seed, fewshot_random_seed=seed,
            task_manager=manager)  # without it lm-eval indexes all its bundled YAMLs again
    finally:
        im.model.train(was_training)
    seconds = round(time.perf_counter() - started, 3)
    settings = {"tasks": list(tasks), "limit": limit, "positions": None if positions is None else len(positions),
                "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
                "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
                "seconds_note": "seconds: the whole harness run (all its tasks), model loading excluded"}
    results = {name: _to_result(name, out, im.label, settings, seconds) for name in out["results"]
               if name in {t.task_name for t in task_objs}}
    if out_dir is not None:
        for result in results.values():
            write_result(Path(out_dir), result)
    return results

