"""Command line: a table of command name -> typed function. No logic lives here."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.training import interrupt

TEMPLATES = {"sft-lora": {}}  # template name -> overrides of the defaults


def cmd_init(path: str, template: str, force: bool) -> int:
    from tunesmith.atomic import write_text
    from tunesmith.config import commented_template, parse_config

    out = Path(path)
    if out.exists() and not force:
        raise TunesmithError(f"{out} already exists; pass --force to overwrite it")
    write_text(out, commented_template(parse_config(TEMPLATES[template], template)))
    print(f"wrote {out} (template {template}); edit it, then: tunesmith train {out}")
    return 0


def cmd_train(config: str, overrides: list[str], skip_invalid: bool = False, resume: bool = False,
              nproc: int | None = None, force: bool = False) -> int:
    from tunesmith.config import load_config
    from tunesmith.recipes import run_recipe
    from tunesmith.training.distributed.launch import launch, wants_launch

    overrides = [*overrides, *([f"train.distributed.workers={nproc}"] if nproc else [])]
    cfg = load_config(config, [*overrides, *(["data.skip_invalid=true"] if skip_invalid else [])])
    if wants_launch(cfg.train.distributed):  # start the ranks, each running this same command
        flags = [*(["--skip-invalid"] if skip_invalid else []), *(["--resume"] if resume else []),
                 *(["--force"] if force else [])]
        return launch(cfg.train.distributed, ["train", config, *flags, *overrides])
    run_recipe(cfg, resume=resume, force=force)
    return 0


def cmd_plan(config: str, overrides: list[str], device: str | None, gpus: int | None, json: str | None,
             no_data: bool) -> int:
    from tunesmith.atomic import write_json
    from tunesmith.config import load_config
    from tunesmith.plan.devices import parse_device
    from tunesmith.plan.report import make_plan

    cfg = load_config(config, overrides)
    plan = make_plan(cfg, device=parse_device(device) if device else None,
                     gpus=gpus or cfg.train.distributed.workers or 1, data=not no_data)
    print(plan.text())
    if json:
        write_json(json, plan.to_json())
        print(f"wrote {json}")
    return 0 if plan.fits else 1


def cmd_runs_list(dir: str) -> int:
    from tunesmith.runs import list_runs

    print(list_runs(Path(dir)))
    return 0


def cmd_runs_show(run: str) -> int:
    from tunesmith.runs import show_run

    print(show_run(Path(run)))
    return 0


def cmd_runs_compare(runs: list[str], plot: str | None) -> int:
    from tunesmith.runs import compare_runs

    print(compare_runs([Path(r) for r in runs], Path(plot) if plot else None))
    return 0


def cmd_models_list() -> int:
    from tunesmith.models.registry import list_models, tunesmith_home

    rows = list_models()
    print(f"cache: {tunesmith_home() / 'models'}")
    for row in [r for r in rows if "repo" not in r]:
        print(f"  {row['name']:<24} {row['description']}\n  {'':<24} {row['state']}")
    print("hub models tested per family (model.name=ALIAS downloads REPO into the Hugging Face cache):")
    family = None
    for row in [r for r in rows if "repo" in r]:
        if row["family"] != family:
            family = row["family"]
            print(f"  {family}: {row['description']}")
        print(f"    {row['name']:<24} {row['repo']:<36} {row['state']}")
    print("needs download: use model.name=ALIAS while online, or `hf download REPO --local-dir DIR` and "
          "model.name=DIR;\ngated: first accept the terms at https://huggingface.co/REPO and log in (hf auth login)")
    return 0


def _conversation(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def cmd_generate(model: str, prompt: list[str], system: str | None, max_new_tokens: int,
                 temperature: float, no_adapter: bool) -> int:
    from tunesmith.generation import generate, load_for_inference

    im = load_for_inference(model, adapter=not no_adapter)
    replies = generate(im, [_conversation(system, p) for p in prompt], max_new_tokens, temperature=temperature)
    for p, reply in zip(prompt, replies):
        if len(prompt) > 1:
            print(f"> {p}")
        print(reply)
    return 0


def cmd_chat(model: str, system: str | None, max_new_tokens: int, temperature: float) -> int:
    from tunesmith.generation import generate, load_for_inference

    im = load_for_inference(model)
    history = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {im.label}; empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = generate(im, [history], max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def cmd_demo(model: str, output_dir: str, name: str | None, train_size: int, epochs: float) -> int:
    from tunesmith.demo.run import run_demo

    run_demo(model=model, output_dir=output_dir, name=name, train_size=train_size, epochs=epochs)
    return 0


def cmd_data_inspect(path: str, model: str, max_length: int, format: str, columns: list[str],
                     near_dup_threshold: float, eval: list[str], ngram: int, train_on: str, template: str | None,
                     skip_invalid: bool, json: str | None, plot: str | None, workers: int) -> int:
    from tunesmith.data.inspect import InspectOptions, parse_columns, run_inspect

    opts = InspectOptions(model=model, max_length=max_length, format=format, columns=parse_columns(columns),
                          train_on=train_on, template=template, near_dup_threshold=near_dup_threshold,
                          eval_files=eval, ngram=ngram, skip_invalid=skip_invalid, workers=workers)
    run_inspect(path, opts, json_out=json, plot_out=plot)
    return 0


def cmd_data_prepare(config: str, overrides: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.data.prepare import run_prepare

    run_prepare(load_config(config, overrides))
    return 0


def _data_commands(sub) -> None:
    from tunesmith.config import DataSection, PrepareSection, allowed_values, registered_names
    from tunesmith.models.registry import DEFAULT_MODEL

    dsub = sub.add_parser("data", help="data: inspect a data file, prepare clean splits").add_subparsers(
        dest="data_command", required=True)
    s = dsub.add_parser("inspect", help="report formats, invalid rows, duplicates, token lengths, PII, contamination")
    s.add_argument("path", help="data file or glob")
    s.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer and chat template measure lengths")
    s.add_argument("--max-length", type=int, default=DataSection.model_fields["max_length"].default,
                   help="tokens kept per example in training; longer rows are reported as truncated")
    s.add_argument("--format", default="auto", choices=registered_names("data format"))
    s.add_argument("--columns", nargs="+", action="extend", default=[], metavar="FIELD=COLUMN",
                   help="map columns to a format's fields, e.g. instruction=question output=answer")
    prepare = PrepareSection.model_fields
    s.add_argument("--near-dup-threshold", type=float, default=prepare["near_dup_threshold"].default,
                   help="MinHash Jaccard similarity above which two rows are near-duplicates")
    s.add_argument("--eval", nargs="+", action="extend", default=[], metavar="FILE",
                   help="eval files to check for contamination (word n-gram overlap)")
    s.add_argument("--ngram", type=int, default=prepare["contamination_ngram"].default,
                   help="words per n-gram for the contamination check")
    s.add_argument("--train-on", default="all_assistant",
                   choices=allowed_values(DataSection.model_fields["train_on"].annotation))
    s.add_argument("--template", default=None, choices=registered_names("chat template"),
                   help="named chat template (default: the tokenizer's own)")
    s.add_argument("--skip-invalid", action="store_true", help="list invalid rows and go on instead of stopping")
    s.add_argument("--json", default=None, metavar="OUT", help="write the full report as JSON")
    s.add_argument("--plot", default=None, metavar="OUT.png", help="write a token-length histogram")
    s.add_argument("--workers", type=int, default=0, help="processes for tokenising and hashing (0: all cores)")
    s.set_defaults(fn=cmd_data_inspect)

    s = dsub.add_parser("prepare", help="split, clean and write train/validation/test: tunesmith data prepare CONFIG")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="e.g. prepare.seed=1 prepare.dedup=exact")
    s.set_defaults(fn=cmd_data_prepare)


def cmd_compare(models: list[str], config: str | None, task: list[str], out: str | None, threshold: float | None,
                gate: list[str], html: str | None, reuse: bool, fail_on_forgetting: bool) -> int:
    from tunesmith.eval.compare import run_compare

    return run_compare(models, config, task, out, threshold, gate, html, reuse, fail_on_forgetting)


def cmd_judge(results: list[str], endpoint: str | None, judge_model: str | None, local: str | None, mode: str,
              api_key_env: str, limit: int | None, out: str | None) -> int:
    from tunesmith.eval.judge import run_judge

    return run_judge(results, endpoint, judge_model, local, mode, api_key_env, limit, out)


def _compare_commands(sub) -> None:
    s = sub.add_parser("compare", help="base vs tuned on the same tasks: deltas, forgetting, gates, HTML report")
    s.add_argument("models", nargs="+", metavar="MODEL",
                   help="BASE TUNED (run directories or model specs), or one run directory: its base model vs it")
    s.add_argument("--config", default=None,
                   help="config whose eval.tasks/gates/forgetting_threshold to use (default: the tuned run's own "
                        "config.yaml when no --task is given)")
    s.add_argument("--task", action="append", default=[], metavar="NAME=KIND:PATH",
                   help="a task, e.g. qa=generation:test.jsonl (KIND: perplexity | generation | multiple_choice)")
    s.add_argument("--out", default=None, help="results folder (default: TUNED/eval/compare for a run, else compare)")
    s.add_argument("--threshold", type=float, default=None,
                   help="points a general task may drop before forgetting is flagged (default: "
                        "eval.forgetting_threshold, 2)")
    s.add_argument("--gate", action="append", default=[], metavar="TASK/METRIC=MIN",
                   help="least tuned-minus-base change in points, e.g. qa/exact_match=5; a failed gate exits 1")
    s.add_argument("--html", default=None, help="HTML report path (default: OUT/compare.html)")
    s.add_argument("--reuse", action="store_true",
                   help="reuse result files in OUT made by the same model with the same task settings")
    s.add_argument("--fail-on-forgetting", action="store_true", help="exit 1 when forgetting is flagged")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("judge", help="pairwise LLM-as-judge of two result files of one generation task")
    s.add_argument("results", nargs=2, metavar="RESULT.json", help="BASE.json TUNED.json (e.g. compare's "
                                                                     "base/TASK.json and tuned/TASK.json)")
    s.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    s.add_argument("--judge-model", default=None, help="model name the endpoint serves")
    s.add_argument("--local", default=None, help="judge with a local model (alias, directory, run directory)")
    s.add_argument("--mode", default="logprob", choices=["logprob", "generate"],
                   help="local judge: likelier of the answers 'A'/'B', or parse generated text")
    s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    s.add_argument("--limit", type=int, default=None, help="judge only the first N pairs")
    s.add_argument("--out", default=None, help="write every verdict as JSON")
    s.set_defaults(fn=cmd_judge)


def cmd_eval(model: str, config: str | None, task: list[str], metrics: list[str] | None, limit: int | None,
             no_adapter: bool, out: str | None, harness: str | None, harness_limit: int | None) -> int:
    from tunesmith.eval.run import run_eval

    run_eval(model, config=config, task_flags=task, metrics=metrics, limit=limit, adapter=not no_adapter,
             out=out, harness=harness, harness_limit=harness_limit)
    return 0


def cmd_score(model: str, data: str, limit: int | None, batch_size: int) -> int:
    from tunesmith.eval.reward import run_score

    run_score(model, data, limit=limit, batch_size=batch_size)
    return 0


def _eval_commands(sub) -> None:
    from tunesmith.config import registered_names

    metrics = registered_names("generation metric")

    s = sub.add_parser("eval", help="evaluate a run or model on eval tasks: tunesmith eval RUN_OR_MODEL")
    s.add_argument("model", help="run directory, alias, model directory, .gguf file or hub id")
    s.add_argument("--config", default=None,
                   help="config whose eval.tasks to run (default: a run directory's own config.yaml)")
    s.add_argument("--task", action="append", default=[], metavar="NAME=KIND:PATH",
                   help="extra task (repeatable), e.g. ppl=perplexity:notes.txt or qa=generation:test.jsonl")
    s.add_argument("--metrics", nargs="+", default=None, choices=metrics,
                   metavar="METRIC", help="metrics of the --task generation tasks (the first is the primary): "
                                          f"{', '.join(metrics)}")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of every task")
    s.add_argument("--no-adapter", action="store_true",
                   help="evaluate a run's base model (results go to RUN/eval/base/)")
    s.add_argument("--out", default=None,
                   help="results directory (default: RUN/eval; required for a model that is not a run)")
    s.add_argument("--harness", default=None, metavar="TASKS",
                   help="lm-eval harness tasks, comma-separated (e.g. arc_easy,hellaswag)")
    s.add_argument("--harness-limit", type=int, default=None, help="examples per harness task")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("score", help="a reward model's pair accuracy: tunesmith score RM --data pairs.jsonl")
    s.add_argument("model", metavar="RM", help="reward model run directory (trained with objective.name=reward)")
    s.add_argument("--data", required=True, help="preference pairs (prompt/chosen/rejected or hh-rlhf transcripts)")
    s.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    s.add_argument("--batch-size", type=int, default=8, help="conversations per forward")
    s.set_defaults(fn=cmd_score)


def cmd_export(run: str, format: str, out: str | None, quant: str, dtype: str, check: bool, force: bool) -> int:
    from tunesmith.export import export_run

    dest = Path(out) if out else Path(run) / "export" / format
    quants = [q.strip() for q in quant.split(",") if q.strip()]
    export_run(run, format, dest, force=force, quant=quants if format == "gguf" else None,
               dtype=dtype if format == "merged" else None, check=check if format == "gguf" else None)
    print(f"exported {run} as {format} -> {dest}")
    return 0


def _export_commands(sub) -> None:
    from tunesmith.export import GGUF_TYPES, FORMATS
    from tunesmith.export.merge import DTYPES

    s = sub.add_parser("export", help="export a run: PEFT adapter, merged HF model, or GGUF + Ollama Modelfile")
    s.add_argument("run", help="run directory")
    s.add_argument("--format", required=True, choices=sorted(FORMATS))
    s.add_argument("--out", default=None, help="output directory (default: RUN/export/FORMAT)")
    s.add_argument("--quant", default="q8_0", metavar="TYPES",
                   help=f"GGUF types, comma-separated: {', '.join(GGUF_TYPES)} (default q8_0)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="merged model weight type")
    s.add_argument("--check", action="store_true",
                   help="GGUF: compare greedy outputs and logits of adapter-on-base, merged and each GGUF in "
                        "llama.cpp on fixed prompts (writes parity.json)")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.set_defaults(fn=cmd_export)


def cmd_serve(model: str, adapters: str | None, host: str, port: int, api_key: str | None, max_batch: int,
              max_body_bytes: int, max_prompt_tokens: int, max_tokens_limit: int, prefix_cache_mb: float,
              jobs: str | None, max_upload_mb: float, max_jobs: int | None) -> int:
    from tunesmith.serve.app import serve, served_name

    addon = None
    if jobs is not None:  # the jobs API and dashboard on the same app (jobs/service.py)
        from tunesmith.jobs.service import JobsService, jobs_limits

        addon = JobsService(jobs, model, served_name(model), jobs_limits(max_upload_mb, max_jobs))
    serve(model, adapters_dir=adapters, host=host, port=port, api_key=api_key, max_batch=max_batch,
          max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
          prefix_cache_mb=prefix_cache_mb, addon=addon)
    return 0


def _serve_commands(sub) -> None:
    from tunesmith.models.registry import DEFAULT_MODEL
    from tunesmith.serve.checks import Limits
    from tunesmith.serve.prefix_cache import DEFAULT_MB

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: a model or run, plus many adapters on its base")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"run directory, alias, model directory, .gguf file or hub id (the base; default "
                        f"{DEFAULT_MODEL})")
    s.add_argument("--adapters", default=None, metavar="DIR",
                   help="folder of adapters (PEFT adapter folders or run directories); each is a model name")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $TUNESMITH_API_KEY; prefer the variable, "
                        "a command line is visible to other users)")
    s.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    s.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    s.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    s.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens_limit,
                   help="largest max_tokens a request may ask for")
    s.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_MB, metavar="MiB",
                   help=f"memory for the KV of prompt heads shared between requests (system prompts, chat "
                        f"history), reused instead of recomputed; 0 turns it off (default {DEFAULT_MB:g})")
    s.add_argument("--jobs", default=None, metavar="DIR",
                   help="also serve OpenAI-style fine-tuning jobs (/v1/files, /v1/fine_tuning/jobs) and the web "
                        "dashboard at /, with their state and files in DIR (created when missing); each job "
                        "fine-tunes MODEL and is served as an adapter on it when it succeeds")
    s.add_argument("--max-upload-mb", type=float, default=512, help="--jobs: largest uploaded file (default 512)")
    s.add_argument("--max-jobs", type=int, default=None, metavar="N",
                   help="--jobs: jobs training at once (default: 1 on CPU, one per GPU)")
    s.set_defaults(fn=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from tunesmith import __version__
    from tunesmith.models.registry import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune language models end to end.")
    p.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a commented starter config")
    s.add_argument("path", nargs="?", default="tunesmith.yaml")
    s.add_argument("--template", choices=sorted(TEMPLATES), default="sft-lora")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("train", help="train from a config: tunesmith train CONFIG [key.sub=value ...]")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 method.r=8")
    s.add_argument("--skip-invalid", action="store_true",
                   help="quarantine invalid data rows (DATA.quarantine.jsonl) instead of stopping at the first")
    s.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of this config from its last checkpoint")
    s.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU; torchrun started by tunesmith); "
                        "same as train.distributed.workers=N")
    s.add_argument("--force", action="store_true",
                   help="start the run even when its plan says it will not fit in the device's memory")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("plan", help="will a run fit, how long will it take, what to change: before any step runs",
                       description="Estimate a config's parameters, memory per device (component by component), "
                                   "time, and when it does not fit the cheapest changes that make it fit. "
                                   "Exit status: 0 when it fits, 1 when it does not, 2 on an error.")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="e.g. model.name=meta-llama/Llama-3.1-8B method.name=qlora")
    s.add_argument("--device", default=None, metavar="NAME_OR_NUMBERS",
                   help='target device: a GPU by name ("H100 80GB", a100-40gb, cpu) or by numbers '
                        '("80GB,989TFLOPS"); default: this machine (probed)')
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="devices the run spans (default: train.distributed.workers, else 1)")
    s.add_argument("--json", default=None, metavar="FILE", help="also write the whole plan as JSON")
    s.add_argument("--no-data", action="store_true",
                   help="do not read the training data: assume every example is data.max_length tokens")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("runs", help="runs: list, show and compare run directories")
    rsub = s.add_subparsers(dest="runs_command", required=True)
    r = rsub.add_parser("list", help="finished runs under a directory")
    r.add_argument("--dir", default="runs")
    r.set_defaults(fn=cmd_runs_list)
    r = rsub.add_parser("show", help="one run: summary, data, versions, eval results")
    r.add_argument("run")
    r.set_defaults(fn=cmd_runs_show)
    r = rsub.add_parser("compare", help="runs side by side, config differences, overlaid loss curves")
    r.add_argument("runs", nargs="+")
    r.add_argument("--plot", default=None, help="write overlaid loss curves to this PNG")
    r.set_defaults(fn=cmd_runs_compare)

    s = sub.add_parser("models", help="models: list aliases and the conversion cache")
    msub = s.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="aliases and cached models").set_defaults(fn=cmd_models_list)

    for name, helptext in (("generate", "generate replies from a run or model"),
                           ("chat", "chat interactively with a run or model")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("model", help="run directory, alias, model directory, .gguf file or hub id")
        if name == "generate":
            s.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
            s.add_argument("--no-adapter", action="store_true", help="use a run's base model only")
        s.add_argument("--system", default=None, help="system message")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        s.set_defaults(fn=cmd_generate if name == "generate" else cmd_chat)

    s = sub.add_parser("demo", help="the main job: base eval -> LoRA fine-tune -> tuned eval, on a generated task")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--output-dir", default="runs")
    s.add_argument("--name", default=None)
    s.add_argument("--train-size", type=int, default=240)
    s.add_argument("--epochs", type=float, default=1.0)
    s.set_defaults(fn=cmd_demo)

    _data_commands(sub)
    _eval_commands(sub)
    _compare_commands(sub)
    _export_commands(sub)
    _serve_commands(sub)
    return p


# Upstream messages that tell a tunesmith user nothing they can act on, by logger and exact enough a
# pattern to catch nothing else. Reports of missing, unexpected or newly initialised weights (the
# transformers LOAD REPORT) are a real mistake signal and never belong here.
KNOWN_NOISE = {
    # greedy decoding of a model whose generation_config carries sampling settings (SmolLM2's does)
    "transformers": [r"The following generation flags are not valid and may be ignored"],
    # bitsandbytes' optional CPU kernel package, printed at import for every run (peft imports it)
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
}
# FutureWarnings raised inside these packages are deprecations between them (peft calling a renamed
# transformers API); ones raised in other code, the user's included, still show.
QUIET_FUTURE_WARNINGS = r"(transformers|peft)(\.|$)"


class _DropKnownNoise(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_upstream() -> None:
    """Keep upstream chatter (progress bars per tensor, deprecations between libraries, the
    KNOWN_NOISE messages) from hiding our progress lines, and let every other warning through."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=QUIET_FUTURE_WARNINGS)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:
        pass
    for name, patterns in KNOWN_NOISE.items():
        noise = _DropKnownNoise(patterns)
        logger = logging.getLogger(name)
        logger.addFilter(noise)  # records logged on this logger itself
        for handler in logger.handlers:  # and, for a library root logger, those of its modules
            handler.addFilter(noise)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends a nargs="*" positional at the first flag, so in `train C --skip-invalid a.b=1`
    # the override after the flag comes back unparsed; it is still an override.
    if rest and isinstance(getattr(args, "overrides", None), list) and not any(r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _with_allocator(args: argparse.Namespace) -> None:
    """`tunesmith train` / `demo` from a shell: restart once with train.allocator preloaded
    (training/allocator.py). Only for a real command line: a caller's process is left alone."""
    from tunesmith.training.allocator import reexec_with

    choice = "auto"
    if args.command == "train":
        from tunesmith.config import load_config

        try:
            choice = load_config(args.config, list(args.overrides)).train.allocator
        except TunesmithError:
            return  # the run itself reports the config error
    reexec_with(choice, sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None and args.command in ("train", "demo"):
        _with_allocator(args)
    quiet_upstream()
    interrupt.install()  # SIGINT and SIGTERM stop any command, in any phase (training/interrupt.py)
    kwargs = {k: v for k, v in vars(args).items() if k != "fn" and k != "command" and not k.endswith("_command")}
    try:
        return args.fn(**kwargs)
    except TunesmithError as exc:
        print(_with_notes(f"error: {exc}", exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # what was kept or removed is in the notes (training/rundir.py)
        print(_with_notes("interrupted", exc), file=sys.stderr)
        if argv is None:
            _leave_if_examples_running(130)
        return 130
    finally:
        interrupt.clear()


def _leave_if_examples_running(code: int) -> None:
    """Exit now, the run being cleaned up already, rather than wait at interpreter exit for example
    threads to finish the examples they are in (training/concurrent.py): those cannot be stopped
    mid-example, and on a large model one can take many seconds. Only for a real command line."""
    concurrent = sys.modules.get("tunesmith.training.concurrent")
    if concurrent is not None and concurrent.examples_running():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _with_notes(message: str, exc: BaseException) -> str:
    return "\n".join([message, *getattr(exc, "__notes__", [])])


if __name__ == "__main__":
    sys.exit(main())
