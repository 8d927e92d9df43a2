"""tunesmith online RL (objective.name=rl, group advantages) vs TRL GRPOTrainer (+PEFT) on the same
model, prompts, k, lengths, steps, initial adapter, loss and reward.

    python benchmarks/rl_vs_trl.py [--model smollm2-135m-instruct|DIR] [--tiny] [--steps 8] [--batch 2]
        [--k 4] [--max-new-tokens 64] [--rows trl,trl+alloc,tunesmith] [--trl KEY=VALUE ...]
        [--tunesmith a.b=VALUE ...] [--repeat N]

Rows (each its own fresh process, one after the other, so peak RSS is its own): `trl`, GRPOTrainer at
its best configuration here (TRL_BEST) with glibc's allocator; `trl+<allocator>`, the same with the
allocator `tunesmith train` preloads; `tunesmith`, its RL recipe (recipes/rl.py). The headline ratio
is against the faster TRL row (named). --repeat N runs every row N times, round by round (rows
interleaved, so a slow spell of the machine hits each side), prints each round's table and ratio,
and ends with the median of the rounds' ratios: on a shared 2-core VM one round's ratio moved by
+-20% from run to run.

What is the same for every row
  * model: the embedded SmolLM2-135M-Instruct (--model another; --tiny: SmolLM2's config shrunk to 4
    layers of width 256 with random weights and its real tokenizer: a smoke test, about 30-50 s a row);
    LoRA r=16, alpha=32, dropout 0 on all linear layers, built by tunesmith's LoRA builder after
    torch.manual_seed(0) and handed to TRL as a PeftModel (each row reports a fingerprint of it);
    the reference is the base with the adapter disabled on both sides;
  * prompts: the demo's order notes (src/tunesmith/demo/orders.py), each with the demo's SYSTEM
    prompt, as conversational prompts [system, user] rendered by the model's chat template with the
    assistant header; the reference JSON in a `reference` column. One epoch: steps x batch prompts,
    each prompt in exactly one step on both sides (the order within the epoch may differ: TRL reads
    the file in order, tunesmith shuffles with its seed), so both sides process the same prompt tokens,
    and the benchmark stops if their prompt-token totals differ;
  * per step: `batch` prompts x k completions, all generated in one batch (TRL: generation_batch_size
    = batch x k, one optimizer step per generation, num_iterations 1), sampled at temperature 1.0,
    top-p 1, no top-k, up to max_new_tokens each (ending at the end-of-turn token, counted);
  * the objective: GRPO (group-relative advantages scaled by the group's std; PPO-clip epsilon 0.2;
    TRL's loss_type "grpo" = tunesmith's rl_loss grpo), KL penalty beta 0.04 (TRL beta = tunesmith
    objective.kl_coef); AdamW lr 1e-5, constant, no warmup, clipping at 1.0, no weight decay, seed 0;
  * the reward: JSON validity, 1 when the reply opens with one JSON object (a ```json fence allowed,
    what follows the object ignored) and 0 otherwise (TRL: json_valid below, a plain reward function
    with TRL's signature; tunesmith: objective.rewards=[{function: json}], which reads a reply so).
  * precision (PRECISION): where the CPU has native bf16 (avx512_bf16 or AMX), bf16 on both sides: the
    frozen base loaded in bf16 (TRL: the dtype its model_init_kwargs would load with, applied to the model
    handed to it; tunesmith: train.precision=bf16, whose adapters keep the frozen base in bf16,
    Placement.frozen_dtype) with fp32 adapters, the training passes under bf16 autocast (TRL bf16=True);
    elsewhere fp32 on both sides (bf16 is emulated there, 8-13x slower).
  Not the same: TRL generates with transformers' generate, tunesmith with its own KV-cached sampler.
  `same_settings` checks the TRL config (after GRPOConfig resolves its defaults) against the tunesmith
  config, field by field, before any row runs.

Tokens: each completion's prompt tokens plus its completion tokens (end-of-turn included), summed
over the run: the work both sides are asked for per step (TRL runs every copy of a prompt through the
model; tunesmith reads a group's prompt once and its k completions behind the copied KV cache, when
sampling and when training). TRL counts it from what its `_generate`
returned (prompt_ids, completion_ids); tunesmith from what its loss ran through the model each step
(rl_step.RLLossFn.step_tokens, the manifest's tokens; checked equal). Completion
lengths are sampled, so the two sides' completion tokens differ: tokens/s is per processed token, and
each row prints its mean completion length.

Timing: tokens/s = tokens / wall time of the training steps (generation + scoring + the optimisation
passes; model loading, tokenisation and saving excluded): TRL trainer.train(), tunesmith its
manifest's train_seconds. Generation seconds are shown apart: TRL's `_generate` timed (tokenising the
prompts, transformers' generate with its KV cache, decoding), tunesmith its per-step generation_seconds
(metrics.jsonl); `train s` is the rest (scoring the rewards included, on both sides). `other CPU`: what
other processes used meanwhile, in cores.

Last line: `ratio tokens_per_s=<x> peak_rss=<y>` (tunesmith / TRL's faster row; with --repeat, the
medians over the rounds, each round's ratio against that round's faster TRL row).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from compile_effect import tiny_model  # noqa: F401 (rl_orders_proof imports it from here)
from _machine import describe, machine_info
from _same_steps import fingerprint
from _workers import allocator_env, busy_flag, parse_overrides, resolved_allocator, run_worker, worker_main

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SEED, LR, BETA, EPSILON, TEMPERATURE, TOP_P = 0, 1e-5, 0.04, 0.2, 1.0, 1.0
DEFAULTS = {"steps": 8, "batch": 2, "k": 4, "max_new_tokens": 64}
TINY = {"steps": 2, "batch": 2, "k": 2, "max_new_tokens": 16}
ROWS = ("trl", "trl+alloc", "tunesmith")
# TRL's best here, besides the precision both sides share (PRECISION in the docstring; bf16 autocast was
# measured faster than fp32 for TRL's training passes on this 2-core EPYC with avx512_bf16, and a bf16 base
# halves the weights its generate reads per token): gradient checkpointing off (TRL's GRPO default is on: it
# re-runs forwards to save memory we have). One micro-batch of batch x k completions: the step's whole
# generation batch trains in one forward/backward.
TRL_BEST = {"activation_checkpointing": False, "gradient_accumulation_steps": 1}


def precision() -> str:
    """bf16 where the CPU computes it natively, else fp32: the same on both sides (see the docstring)."""
    from tunesmith.training.device import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_settings(name: str) -> dict:
    """GRPOConfig's part of `name`: autocast, and the base's dtype (model_init_kwargs: what TRL would load a
    model path with; trl_worker loads the model it hands over so, as TRL's own loading would)."""
    return {"bf16": name == "bf16", "model_init_kwargs": {"dtype": "bfloat16" if name == "bf16" else "float32"}}


# tunesmith's per-step metrics.jsonl keys (recipes/rl.py, training/rl_step.py RLLossFn.pop_metrics)
TUNESMITH_KEYS = {"generation_seconds": "generation_seconds", "reward": "reward"}


def json_valid(prompts, completions, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the reply opens with one JSON object (a ```json fence allowed,
    whatever follows the object ignored), else 0.0: tunesmith's `json` built-in reads a reply so too
    (reward_builtins.reply_object). Conversational completions are [{"role", "content"}] lists."""
    out = []
    for c in completions:
        text = (c[-1]["content"] if isinstance(c, list) else c).strip()
        if text.startswith("```"):
            text = text.split("\n", 1)[-1].lstrip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(text)
        except ValueError:
            obj = None
        out.append(float(isinstance(obj, dict)))
    return out


def write_prompts(path: Path, n: int) -> Path:
    """n demo order notes as conversational prompts with the reference JSON."""
    from tunesmith.demo.orders import make_splits

    rows = make_splits(SEED, {"train": n})["train"]
    path.write_text("".join(json.dumps({"prompt": r["messages"][:2], "reference": r["messages"][2]["content"]}) + "\n"
                            for r in rows))
    return path


def prompt_tokens(model: str, data: Path) -> list[int]:
    """Each prompt's tokens as the chat template renders it with the assistant header."""
    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer(model_path(model))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
                ["input_ids"]) for r in rows]


def model_path(model: str) -> str:
    from tunesmith.models.registry import resolve_model

    return str(resolve_model(model).path) if not Path(model).is_dir() else model


# --- the two configurations, and the check that they ask for the same run -----------------------------

def tunesmith_settings(model: str, data: Path, out: Path, shape: dict, precision_name: str = "fp32") -> dict:
    return {"model": {"name": model}, "data": {"train": str(data), "max_length": 512},
            "method": {"name": "lora", **LORA, "target_modules": "all-linear"},
            "objective": {"name": "rl", "advantage": "group", "rl_loss": "grpo", "num_generations": shape["k"],
                          "max_new_tokens": shape["max_new_tokens"], "temperature": TEMPERATURE, "top_p": TOP_P,
                          "kl_coef": BETA, "epsilon": EPSILON, "scale_rewards": "group",
                          "rewards": [{"function": "json"}]},
            "train": {"max_steps": shape["steps"], "batch_size": shape["batch"], "grad_accum": 1, "lr": LR,
                      "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                      "seed": SEED, "log_every": 1, "precision": precision_name},
            "run": {"name": "bench", "output_dir": str(out)}}


def trl_settings(out: Path, shape: dict, overrides: dict | None = None, precision_name: str = "fp32") -> dict:
    completions = shape["batch"] * shape["k"]
    return {**dict(
        output_dir=str(out / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=shape["steps"], per_device_train_batch_size=completions, generation_batch_size=completions,
        num_generations=shape["k"], num_iterations=1, max_completion_length=shape["max_new_tokens"],
        temperature=TEMPERATURE, top_p=TOP_P, top_k=0, beta=BETA, epsilon=EPSILON, loss_type="grpo",
        scale_rewards="group", max_grad_norm=1.0, weight_decay=0.0, seed=SEED, use_cpu=True, use_vllm=False,
        shuffle_dataset=False, disable_dropout=True, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0), **TRL_BEST, **precision_settings(precision_name), **(overrides or {})}


# (tunesmith dotted key, GRPOConfig attribute, how to compare) — what "the same run" means here
SAME = [("objective.num_generations", "num_generations", None),
        ("objective.max_new_tokens", "max_completion_length", None),
        ("objective.temperature", "temperature", None), ("objective.top_p", "top_p", None),
        ("objective.kl_coef", "beta", None), ("objective.epsilon", "epsilon", None),
        ("objective.rl_loss", "loss_type", None), ("objective.scale_rewards", "scale_rewards", None),
        ("train.lr", "learning_rate", None), ("train.max_steps", "max_steps", None),
        ("train.max_grad_norm", "max_grad_norm", None), ("train.weight_decay", "weight_decay", None),
        ("train.warmup_steps", "warmup_steps", None), ("train.seed", "seed", None),
        ("train.schedule", "lr_scheduler_type", lambda v: str(getattr(v, "value", v)))]


def dig(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def same_settings(ts: dict, args) -> list[str]:
    """Differences between a tunesmith config dict and a resolved GRPOConfig (empty: the same run)."""
    problems = []
    for key, attr, norm in SAME:
        a, b = dig(ts, key), getattr(args, attr)
        if (norm(b) if norm else b) != a:
            problems.append(f"{key}={a!r} but TRL {attr}={b!r}")
    k, batch = ts["objective"]["num_generations"], ts["train"]["batch_size"] * ts["train"]["grad_accum"]
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if per_step != batch * k:
        problems.append(f"TRL trains {per_step} completions per step, tunesmith {batch} prompts x k {k}")
    if args.generation_batch_size != batch * k or args.steps_per_generation != args.gradient_accumulation_steps:
        problems.append(f"TRL generates {args.generation_batch_size} completions every {args.steps_per_generation} "
                        f"micro-steps: not one batch of {batch * k} per optimizer step")
    if args.num_iterations != 1 or args.use_vllm or args.gradient_checkpointing or args.top_k not in (0, None):
        problems.append("TRL: num_iterations 1, use_vllm off, gradient checkpointing off and no top-k expected")
    base_dtype = (args.model_init_kwargs or {}).get("dtype", "float32")
    if (ts["train"]["precision"] == "bf16") != bool(args.bf16) or \
            (ts["train"]["precision"] == "bf16") != (base_dtype == "bfloat16"):
        problems.append(f"train.precision={ts['train']['precision']} but TRL bf16={args.bf16}, base dtype {base_dtype}")
    if ts["objective"]["advantage"] != "group" or [r["function"] for r in ts["objective"]["rewards"]] != ["json"]:
        problems.append("tunesmith: group advantages and the json reward expected")
    return problems


# --- workers (each in its own process) -------------------------------------------------------------

def record_run() -> dict:
    """Record, in this process, the initial trainable weights' fingerprint (where run_rl hands the
    built model to prepare_model, as _same_steps.follow_steps does for run_sft / run_dpo) and each
    rollout's prompt and completion tokens (what rl_step.Rollout tells the loop it processed)."""
    import tunesmith.recipes.sft as sft
    import tunesmith.training.rl_step as rl_step

    seen = {"prompt_tokens": 0, "completion_tokens": 0, "completions": 0}
    prepare, rollout = sft.prepare_model, rl_step.Rollout.__call__

    def recording_prepare(model, cfg, placement):
        seen["fingerprint"] = fingerprint(model)
        return prepare(model, cfg, placement)

    def recording_rollout(self, group, pad_id):
        batch = rollout(self, group, pad_id)
        k = self.obj.num_generations
        prompt = sum(k * len(r.input_ids) for r in group)
        seen["prompt_tokens"] += prompt
        seen["completion_tokens"] += int(batch["mask"].sum())
        seen["completions"] += k * len(group)
        return batch

    sft.prepare_model, rl_step.Rollout.__call__ = recording_prepare, recording_rollout
    return seen


def tunesmith_worker(model: str, data: Path, out: Path, shape: dict, overrides: dict) -> dict:
    from tunesmith.config import apply_overrides, parse_config
    from tunesmith.recipes.rl import run_rl
    from tunesmith.training.logging import read_metrics

    seen = record_run()
    cfg = apply_overrides(tunesmith_settings(model, data, out, shape, precision()),
                          [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    run = run_rl(parse_config(cfg))
    m = json.loads((run / "manifest.json").read_text())
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("step", 0) > 0 and TUNESMITH_KEYS["reward"] in r]
    missing = [v for v in TUNESMITH_KEYS.values() if rows and v not in rows[0]]
    if not rows or missing or len(rows) != m["steps"]:
        raise SystemExit(f"tunesmith's metrics.jsonl has {len(rows)} step rows for {m['steps']} steps, or lacks "
                         f"{missing or list(TUNESMITH_KEYS.values())}: align TUNESMITH_KEYS with recipes/rl.py "
                         "(log_every 1 expected)")
    tokens = seen["prompt_tokens"] + seen["completion_tokens"]
    if m.get("tokens", tokens) != tokens:
        raise SystemExit(f"tunesmith's manifest counts {m['tokens']} tokens, its rollouts {tokens}")
    return {"seconds": m["train_seconds"], **seen,
            "generation_seconds": sum(r[TUNESMITH_KEYS["generation_seconds"]] for r in rows), "steps": m["steps"],
            "rewards": [r[TUNESMITH_KEYS["reward"]] for r in rows], "settings": overrides or {"defaults": True}}


def trl_worker(model: str, data: Path, out: Path, shape: dict, overrides: dict) -> dict:
    import torch
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method
    from tunesmith.models.load import load_model, load_tokenizer

    seen = {"generation_seconds": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "completions": 0}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):  # tokenise + generate + decode: TRL's generation, timed apart
            t0 = time.perf_counter()
            result = super()._generate(prompts)
            seen["generation_seconds"] += time.perf_counter() - t0
            prompt_ids, completion_ids = result[0], result[1]
            seen["prompt_tokens"] += sum(map(len, prompt_ids))
            seen["completion_tokens"] += sum(map(len, completion_ids))
            seen["completions"] += len(completion_ids)
            return result

    path = model_path(model)
    torch.manual_seed(SEED)  # then load and build as the tunesmith recipe does: the same initial adapter
    args = GRPOConfig(**trl_settings(out, shape, overrides, precision()))
    base = load_model(path, dtype=getattr(torch, args.model_init_kwargs["dtype"]))
    args.model_init_kwargs = None  # applied above (TRL warns that it ignores them for a built model)
    base.config.use_cache = True  # load_model turns it off for training; a TRL user's model has it on for generate
    peft_model = get_method("lora").build(base, MethodSection(name="lora", **LORA, target_modules="all-linear"))
    ds = load_dataset("json", data_files=str(data), split="train")
    trainer = Timed(model=peft_model, reward_funcs=[json_valid], args=args, train_dataset=ds,
                    processing_class=load_tokenizer(path))
    start = fingerprint(trainer.model)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, **seen, "steps": trainer.state.global_step, "fingerprint": start,
            "rewards": [r["reward"] for r in trainer.state.log_history if "reward" in r],
            "step_seconds": [r["step_time"] for r in trainer.state.log_history if "step_time" in r],
            "settings": {**TRL_BEST, **precision_settings(precision()), **overrides}}


# --- the parent --------------------------------------------------------------------------------------

def run_row(row: str, args, tmp: Path, model: str, data: Path, shape: dict, env: dict) -> dict:
    kind = "trl" if row.startswith("trl") else "tunesmith"
    overrides = [x for o in getattr(args, kind) for x in (f"--{kind}", o)]
    r = run_worker(row, __file__, ["--worker", kind, "--model", model, "--data", str(data),
                                   "--out", str(tmp / row.replace("+", "_")), "--shape", json.dumps(shape),
                                   *overrides], env)
    r["tokens"] = r["prompt_tokens"] + r["completion_tokens"]
    r["tps"] = r["tokens"] / r["seconds"]
    r["train_seconds"] = r["seconds"] - r["generation_seconds"]
    r["mean_reward"] = sum(r["rewards"]) / max(len(r["rewards"]), 1)
    return r


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL, help="a model name or local directory")
    ap.add_argument("--tiny", action="store_true", help=f"a random shrunk SmolLM2 and {TINY}: a smoke test")
    for key in DEFAULTS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                        help=f"default {DEFAULTS[key]} ({TINY[key]} with --tiny)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every row (interleaved); the last line is the median of the rounds' ratios")
    ap.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="GRPOConfig override")
    ap.add_argument("--tunesmith", action="append", default=[], metavar="a.b=VALUE", help="config override")
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shape", type=json.loads)
    args = ap.parse_args(argv)
    if not args.worker:
        base = TINY if args.tiny else DEFAULTS
        args.shape = {k: getattr(args, k) or base[k] for k in DEFAULTS}
        if set(args.rows.split(",")) - set(ROWS) or min(args.shape.values()) <= 0 or args.shape["k"] < 2 \
                or args.repeat < 1:
            raise SystemExit(f"--rows takes {', '.join(ROWS)}; --steps, --batch, --max-new-tokens, --repeat positive, "
                             "--k >= 2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main({"tunesmith": tunesmith_worker, "trl": trl_worker}, args.worker, args.model, args.data, args.out,
                    args.shape, parse_overrides(getattr(args, args.worker)))
        return
    from trl import GRPOConfig

    rows, shape = args.rows.split(","), args.shape
    alloc_choice = parse_overrides(args.tunesmith).get("train.allocator", "auto")
    if "trl+alloc" in rows and resolved_allocator(alloc_choice) == "system":
        print("no tcmalloc/jemalloc/mimalloc found: the trl+alloc row would be the trl row; skipped")
        rows.remove("trl+alloc")
    machine = machine_info()
    print(describe(machine), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(tiny_model(tmp / "tiny-model")) if args.tiny else args.model
        model_path(model)  # convert an embedded model once, outside every row's timing
        data = write_prompts(tmp / "prompts.jsonl", shape["steps"] * shape["batch"])
        ts = tunesmith_settings(model, data, tmp, shape, precision())
        from tunesmith.config import apply_overrides

        ts = apply_overrides(ts, [f"{k}={json.dumps(v)}" for k, v in parse_overrides(args.tunesmith).items()])
        problems = same_settings(ts, GRPOConfig(**trl_settings(tmp, shape, parse_overrides(args.trl), precision())))
        if problems:
            raise SystemExit("TRL and tunesmith are set up for different runs:\n  " + "\n  ".join(problems))
        prompts = prompt_tokens(model, data)
        print(f"precision: {precision()} on both sides (train.precision={ts['train']['precision']}; TRL bf16="
              f"{precision() == 'bf16'}, base {precision_settings(precision())['model_init_kwargs']['dtype']})")
        print(f"GRPO on {'a tiny random SmolLM2' if args.tiny else model}: {shape['steps']} steps x {shape['batch']} "
              f"demo order-note prompts x k {shape['k']} completions of <= {shape['max_new_tokens']} tokens; "
              f"{sum(prompts)} prompt tokens ({sum(prompts) * shape['k']} with each completion's copy)", flush=True)
        rounds = []
        for n in range(args.repeat):
            res = {}
            for row in rows:
                env = allocator_env("system" if row == "trl" else alloc_choice)
                name = f"trl+{env['TUNESMITH_ALLOCATOR']}" if row == "trl+alloc" else row
                res[name] = run_row(name, args, tmp / f"round{n + 1}", model, data, shape, env)
            rounds.append(res)
            if args.repeat > 1:
                print(f"round {n + 1} of {args.repeat} done", flush=True)
    for row, r in rounds[0].items():
        print(f"  {row}: {json.dumps(r['settings'])}; allocator {r['allocator']}; initial weights {r['fingerprint']}")
    ratios = [report(res, shape, prompts, f"round {n + 1}: " if args.repeat > 1 else "")
              for n, res in enumerate(rounds)]
    if None in ratios:
        return
    if len(rounds) > 1:
        print("per round: " + "; ".join(f"tokens_per_s={t:.2f} peak_rss={m:.2f}" for t, m in ratios))
    print(f"ratio tokens_per_s={median(t for t, _ in ratios):.2f} peak_rss={median(m for _, m in ratios):.2f}"
          + (f" (median of {len(ratios)} rounds)" if len(ratios) > 1 else ""))


def report(res: dict, shape: dict, prompts: list[int], title: str) -> tuple[float, float] | None:
    """One round's table and checks; its (tokens/s, peak RSS) ratios, tunesmith / TRL's faster row
    (None without both). Stops the benchmark where the rows did not run the same thing."""
    print(f"{title + 'row':<16}{'steps':>6}{'tokens':>7}{'compl len':>10}{'gen s':>7}{'train s':>8}{'tok/s':>7}"
          f"{'peak MB':>8}{'reward':>7}{'process s':>10}{'other CPU':>10}")
    for row, r in res.items():
        print(f"{row:<16}{r['steps']:>6}{r['tokens']:>7}{r['completion_tokens'] / max(r['completions'], 1):>10.1f}"
              f"{r['generation_seconds']:>7.1f}{r['train_seconds']:>8.1f}{r['tps']:>7.1f}{r['peak_rss_mb']:>8.0f}"
              f"{r['mean_reward']:>7.3f}{r['process_seconds']:>10.1f}{r['other_cores']:>9.2f}c{busy_flag(r)}")
    problems = [f"{row}: {r['steps']} steps, expected {shape['steps']}" for row, r in res.items()
                if r["steps"] != shape["steps"]]
    problems += [f"{row}: {r['prompt_tokens']} prompt tokens, expected {sum(prompts) * shape['k']}"
                 for row, r in res.items() if r["prompt_tokens"] != sum(prompts) * shape["k"]]
    prints = {r["fingerprint"] for r in res.values() if r["fingerprint"]}
    if len(prints) > 1:
        problems.append("initial weights differ: " + ", ".join(f"{row} {r['fingerprint']}" for row, r in res.items()))
    if problems:
        raise SystemExit("the rows did not run the same thing, so their speeds are not comparable:\n  "
                         + "\n  ".join(problems))
    trl_rows = [k for k in res if k.startswith("trl")]
    if not trl_rows or "tunesmith" not in res:
        return None  # no ratio without both sides (e.g. --rows tunesmith)
    trl_row = max(trl_rows, key=lambda k: res[k]["tps"])
    ours, trl = res["tunesmith"], res[trl_row]
    print(f"TRL row: {trl_row}; ratio tokens_per_s={ours['tps'] / trl['tps']:.2f} "
          f"peak_rss={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
    return ours["tps"] / trl["tps"], ours["peak_rss_mb"] / trl["peak_rss_mb"]


if __name__ == "__main__":
    sys.exit(main())
