"""tunesmith vs TRL SFTTrainer (+PEFT) on the same model, data, steps, initial adapter and loss.

    python benchmarks/sft_vs_trl.py [--method lora|full] [--examples 96] [--rows trl,trl+alloc,tunesmith,...]
        [--trl KEY=VALUE ...] [--tunesmith a.b=VALUE ...] [--search]

Rows (each its own fresh process, one after the other, so peak RSS is its own):
  * trl: SFTTrainer at its best configuration here (TRL_BEST), with glibc's allocator, as
    `python train.py` runs;
  * trl+<allocator>: the same with the allocator `tunesmith train` preloads (train.allocator auto:
    tcmalloc, jemalloc or mimalloc, training/allocator.py), so the allocator's share of the
    difference is visible. The headline ratio is against the faster of the two TRL rows (named);
  * tunesmith: 8 examples per step, one at a time on both threads, with a 250 MB activation budget;
  * tunesmith-fast: its plain defaults (two examples at a time on one thread each).

What is the same for every row
  * model: the embedded SmolLM2-135M-Instruct, fp32; data: the first N GSM8K training rows
    (../shared/data) as conversational prompt/completion records, rendered with the model's chat
    template, trained on the completion only; max length 512; one epoch; AdamW lr 2e-4, constant
    schedule, no warmup, clipping at 1.0, no weight decay, seed 0; LoRA r=16, alpha=32, dropout 0,
    all linear layers;
  * the steps: the same 8 examples in each optimizer step, steps in the same order (_same_steps.py).
    The order is tunesmith's own for 8-example steps (data.batching.epoch_batches(examples, 8,
    seed 0, epoch 0): shuffled, length-grouped); TRL reads the dataset in that order
    (train_sampling_strategy="sequential"), and both tunesmith rows follow it through the loop's
    epoch_batches (on its own, tunesmith forms steps from micro-batches of train.parallel_examples
    examples, so its two rows would train different steps). N must be a multiple of 8;
  * the initial adapter: built by tunesmith's LoRA builder after torch.manual_seed(0), exactly as
    run_sft does, and handed to TRL as a PeftModel; every row reports a sha256 of its initial
    trainable weights and the benchmark stops if they differ;
  * the loss: the mean over the step's trained tokens (TRL: transformers' num_items_in_batch over
    the accumulated micro-batches), on the same targets: TRL also trains the newline the chat
    template writes after <|im_end|>, which the benchmark masks in TRL's batches. Each row prints
    its step-1 loss (same weights, same batch: only normalisation can differ) and its mean loss
    over the epoch; the benchmark stops if the rows disagree by more than STEP1_TOL / EPOCH_TOL
    (relative), because equal speed claims need equal learning, or if any row fed the model other
    examples, tokens or targets.

Timing: tokens/s is real tokens (no padding) over the wall time of the training loop (tunesmith:
the manifest's train_seconds; TRL: trainer.train()), optimizer creation included, model loading,
tokenisation and saving excluded. `other CPU` is the CPU other processes used meanwhile (in cores);
rows above 0.1 are flagged. The machine line (cores, CPU flags, measured fp32 matmul rate) is
benchmarks/_machine.py's.

MFU = achieved model FLOP/s over the measured fp32 matmul rate. Model FLOPs per token: 2 per weight of
every linear layer in the forward, 2 more in the backward for activation gradients, 2 more for weight
gradients where weights train (full fine-tuning); causal attention adds 2*L*d per layer and token
forward (x3 with backward); frozen embeddings are a lookup. Each row counts the work it did: every
position it ran through the model (padding included), and the LM head where it computed it.
tunesmith projects only trained positions; so does TRL 1.x's SFTTrainer (its add_fused_lm_head
scores only positions with a label); older TRL (transformers' own loss) projected every position.

--search runs TRL alone over SEARCH_GRID (packing, batch/accumulation, gradient checkpointing) and
prints each configuration's tokens/s, peak RSS and mean loss: how TRL_BEST was chosen.

Last line: `ratio tokens_per_s=<x> peak_rss=<y> mfu=<z> trl_row=<name>` (tunesmith / TRL's faster row).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _gsm8k import write_data
from _machine import describe, machine_info
from _same_steps import check_rows, fingerprint, follow_steps, steps_of, untrain_after_eos
from _workers import allocator_env, busy_flag, parse_overrides, resolved_allocator, run_worker, worker_main

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
EXAMPLES_PER_STEP = 8      # effective batch, in examples
PACKED_ROWS_PER_STEP = 4   # effective batch when TRL packs: 4 rows of <= 512 tokens ~ 9 examples here
MAX_LENGTH, LR, SEED = 512, 2e-4, 0
STEP1_TOL, EPOCH_TOL = 0.005, 0.02  # relative spread of the rows' step-1 loss / mean loss over the epoch

# TRL's fastest configuration on a 2-core CPU (`--search`; --trl overrides any of it): packing forces
# padding-free rows, whose block-diagonal attention mask costs more than it saves here; one unpadded
# example per forward (batch 1, accumulation 8) keeps sdpa on its causal kernel with no mask and the
# least activation memory; gradient checkpointing only slows it down (it recomputes the forward).
TRL_BEST = {"packing": False, "padding_free": False, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 8, "gradient_checkpointing": False}
SEARCH_GRID = {"packing": [False, True], "batch": [(1, 8), (2, 4), (8, 1)], "gradient_checkpointing": [False, True]}
TUNESMITH = {"train.batch_size": EXAMPLES_PER_STEP, "train.grad_accum": 1, "train.parallel_examples": 1,
             "train.activation_memory_mb": 250}
TUNESMITH_FAST = {"train.batch_size": EXAMPLES_PER_STEP, "train.grad_accum": 1}
ROWS = ("trl", "trl+alloc", "tunesmith", "tunesmith-fast")


def tunesmith_config(data: Path, method: str, out: Path, settings: dict):
    from tunesmith.config import apply_overrides, parse_config

    cfg = {"data": {"train": str(data), "max_length": MAX_LENGTH},
           "method": {"name": method, **LORA},
           "train": {"epochs": 1, "lr": LR, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                     "weight_decay": 0.0, "seed": SEED, "log_every": 1, "precision": "fp32"},
           "run": {"name": "bench", "output_dir": str(out)}}
    return parse_config(apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))


def step_order(data: Path) -> tuple[list[list[int]], list[int]]:
    """(the epoch's steps as example indices, each example's token count), by tunesmith's encoding."""
    from tunesmith.data.templates import apply_template
    from tunesmith.data.tokenize import encode_dataset
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.recipes.sft import load_training_examples

    cfg = tunesmith_config(data, "lora", Path(tempfile.gettempdir()), {})
    tok = load_tokenizer(resolve_model(MODEL).path)
    apply_template(tok, cfg.data.template)
    enc = encode_dataset(tok, load_training_examples(cfg).examples, MAX_LENGTH, "benchmark data", cfg.data.train_on)
    return steps_of(enc, EXAMPLES_PER_STEP, SEED), [len(e.input_ids) for e in enc]


# --- workers (each in its own process) -------------------------------------------------------------

def tunesmith_worker(data: Path, method: str, out: Path, overrides: dict, order: list[list[int]]) -> dict:
    from tunesmith.recipes.sft import run_sft
    from tunesmith.training.logging import read_metrics

    seen = follow_steps(order)  # the steps every row trains, and the initial weights' fingerprint
    settings = {**(TUNESMITH_FAST if os.environ.get("TUNESMITH_BENCH_FAST") else TUNESMITH), **overrides}
    run = run_sft(tunesmith_config(data, method, out, settings))
    m = json.loads((run / "manifest.json").read_text())
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return {"tokens": m["tokens"], "trained_tokens": m["trained_tokens"], "seconds": m["train_seconds"],
            "steps": m["steps"], "examples": m["data"]["train_examples"], "losses": losses,
            "computed_tokens": m["tokens"], "head_rows": m["trained_tokens"], "trainable": m["parameters"]["trainable"],
            "total_params": m["parameters"]["total"], "settings": settings, **seen}


class CountingCollator:
    """Wraps TRL's collator to record what the model is actually fed, and to train the targets
    tunesmith trains (no target right after <|im_end|>: _same_steps.untrain_after_eos)."""

    def __init__(self, inner, eos_id: int):
        self.inner, self.eos_id, self.tokens, self.trained, self.computed = inner, eos_id, 0, 0, 0
        self.tokens_fed, self.masked = [], 0

    def __call__(self, examples):
        self.tokens_fed += [len(e["input_ids"]) for e in examples]
        batch = self.inner(examples)
        self.masked += untrain_after_eos(batch["input_ids"], batch["labels"], self.eos_id, -100)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int((batch["position_ids"] >= 0).sum())
        self.trained += int((batch["labels"][:, 1:] != -100).sum())  # targets: labels shifted by one
        self.computed += batch["input_ids"].numel()  # every position runs through the model, head included
        return batch


def trl_worker(data: Path, method: str, out: Path, overrides: dict, order: list[list[int]]) -> dict:
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import sft_trainer

    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model

    path = resolve_model(MODEL).path
    torch.manual_seed(SEED)  # then load and build exactly as run_sft does: the same initial adapter
    model, tok = load_model(path), load_tokenizer(path)
    if method != "full":
        model = get_method(method).build(model, MethodSection(name=method, **LORA))
    ds = load_dataset("json", data_files=str(data), split="train")
    settings = {**TRL_BEST, **overrides}
    if settings.get("packing") and not {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(overrides):
        settings.update(per_device_train_batch_size=1, gradient_accumulation_steps=PACKED_ROWS_PER_STEP)
    args = SFTConfig(**{**dict(
        output_dir=str(out / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        num_train_epochs=1, max_length=MAX_LENGTH, max_grad_norm=1.0, weight_decay=0.0, seed=SEED, bf16=False,
        fp16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], completion_only_loss=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential"), **settings})  # the benchmark's order
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds.select([i for step in order for i in step]),
                      processing_class=tok)
    counter = CountingCollator(trainer.data_collator, tok.eos_token_id)
    trainer.data_collator = counter
    start = fingerprint(trainer.model)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"tokens": counter.tokens, "trained_tokens": counter.trained, "seconds": seconds,
            "steps": trainer.state.global_step, "examples": len(ds), "losses": losses, "tokens_fed": counter.tokens_fed,
            "computed_tokens": counter.computed, "trainable": n_train,
            "total_params": sum(p.numel() for p in trainer.model.parameters()), "settings": settings,
            "fingerprint": start, "torch_threads": torch.get_num_threads(), "masked_after_eos": counter.masked,
            # TRL 1.x projects only labelled positions through the LM head (add_fused_lm_head); older TRL all
            "head_rows": counter.trained if hasattr(sft_trainer, "add_fused_lm_head") else counter.computed}


# --- measurement -----------------------------------------------------------------------------------

def flops_per_token(method: str, head_share: float, mean_len: float) -> float:
    """Model FLOPs per token of SmolLM2-135M (module docstring): `tunesmith plan`'s formula
    (plan/throughput.py), without the adapter's own FLOPs, as this benchmark has always counted;
    head_share: the share of positions whose hidden state goes through the LM head."""
    from tunesmith.models.registry import resolve_model
    from tunesmith.plan.shapes import ModelShape, model_config
    from tunesmith.plan.throughput import flops_per_token as plan_flops

    shape = ModelShape.from_config(model_config(str(resolve_model(MODEL).path))[0])
    return plan_flops(shape, method, head_share, mean_len)


def model_flops(method: str, r: dict) -> float:
    """FLOPs the row's training computed: every position it ran (padding included), the LM head on
    the rows it projected (`head_rows`)."""
    n = r["computed_tokens"]
    return n * flops_per_token(method, r["head_rows"] / n, n / r["examples"])


def run_rows(rows: list[str], args, tmp: Path, data: Path, order_file: Path) -> dict:
    alloc_choice = parse_overrides(args.tunesmith).get("train.allocator", "auto")
    res = {}
    for row in rows:
        kind = "trl" if row.startswith("trl") else "tunesmith"
        env = allocator_env({"trl": "system", "trl+alloc": alloc_choice}.get(row, alloc_choice))
        env.pop("TUNESMITH_BENCH_FAST", None)
        if row == "tunesmith-fast":
            env["TUNESMITH_BENCH_FAST"] = "1"
        name = f"trl+{env['TUNESMITH_ALLOCATOR']}" if row == "trl+alloc" else row
        overrides = [x for o in (args.trl if kind == "trl" else args.tunesmith) for x in (f"--{kind}", o)]
        res[name] = run_worker(name, __file__, ["--worker", kind, "--data", str(data), "--method", args.method,
                                      "--out", str(tmp / name), "--order", str(order_file), *overrides], env)
        res[name]["mean_loss"] = sum(res[name]["losses"]) / max(len(res[name]["losses"]), 1)
    return res


def print_table(res: dict, method: str, rate: float) -> None:
    for row, r in res.items():
        print(f"  {row}: {json.dumps(r['settings'])}; allocator {r['allocator']}; trainable {r['trainable']:,} of "
              f"{r['total_params']:,}; initial weights {r['fingerprint']}"
              + (f"; targets after EOS masked {r['masked_after_eos']}" if "masked_after_eos" in r else ""))
    print(f"{'row':<16}{'steps':>6}{'tokens':>7}{'trained':>8}{'train s':>8}{'tok/s':>7}{'peak MB':>8}{'MFU':>6}"
          f"{'step-1 loss':>12}{'mean loss':>10}{'process s':>10}{'other CPU':>10}")
    for row, r in res.items():
        r["tps"] = r["tokens"] / r["seconds"]
        r["mfu"] = model_flops(method, r) / r["seconds"] / (rate * 1e9)
        print(f"{row:<16}{r['steps']:>6}{r['tokens']:>7}{r['trained_tokens']:>8}{r['seconds']:>8.1f}{r['tps']:>7.1f}"
              f"{r['peak_rss_mb']:>8.0f}{r['mfu']:>6.3f}{r['losses'][0] if r['losses'] else float('nan'):>12.4f}"
              f"{r['mean_loss']:>10.4f}{r['process_seconds']:>10.1f}{r['other_cores']:>9.2f}c{busy_flag(r)}")


def search(args, tmp: Path, data: Path, order_file: Path) -> None:
    """TRL alone over SEARCH_GRID, with glibc's allocator (how TRL_BEST was chosen)."""
    configs = []
    for packing, (batch, accum), gc in itertools.product(*SEARCH_GRID.values()):
        if packing and batch > 1:
            continue  # packed rows: one row of <= 512 tokens per forward, PACKED_ROWS_PER_STEP a step
        configs.append({"packing": packing, "padding_free": packing, "gradient_checkpointing": gc,
                        **({} if packing else {"per_device_train_batch_size": batch,
                                               "gradient_accumulation_steps": accum})})
    res = {}
    for i, cfg in enumerate(configs):
        overrides = [x for k, v in cfg.items() for x in ("--trl", f"{k}={json.dumps(v)}")]
        res[f"trl#{i}"] = run_worker(f"trl#{i}", __file__, ["--worker", "trl", "--data", str(data),
                                                            "--method", args.method,
                                                  "--out", str(tmp / f"s{i}"), "--order", str(order_file),
                                                  *overrides, *[x for o in args.trl for x in ("--trl", o)]],
                                     allocator_env("system"))
        r = res[f"trl#{i}"]
        r["tps"] = r["tokens"] / r["seconds"]
        print(f"trl#{i}: {r['tps']:7.1f} tok/s  peak {r['peak_rss_mb']:6.0f} MB  mean loss "
              f"{sum(r['losses']) / max(len(r['losses']), 1):.4f}  {json.dumps(r['settings'])}{busy_flag(r)}",
              flush=True)
    best = max(res, key=lambda k: res[k]["tps"])
    print(f"fastest: {best} {json.dumps(res[best]['settings'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--examples", type=int, default=96, help=f"a multiple of {EXAMPLES_PER_STEP}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="SFTConfig override")
    ap.add_argument("--tunesmith", action="append", default=[], metavar="a.b=VALUE", help="config override")
    ap.add_argument("--search", action="store_true", help="search TRL's fastest configuration instead")
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--order", type=Path)
    args = ap.parse_args()
    if args.worker:
        fn = tunesmith_worker if args.worker == "tunesmith" else trl_worker
        worker_main({args.worker: fn}, args.worker, args.data, args.method, args.out,
                    parse_overrides(getattr(args, args.worker)), json.loads(args.order.read_text()))
        return
    rows = args.rows.split(",")
    if set(rows) - set(ROWS) or args.examples % EXAMPLES_PER_STEP or args.examples <= 0:
        raise SystemExit(f"--rows takes {', '.join(ROWS)}; --examples a positive multiple of {EXAMPLES_PER_STEP}")
    from tunesmith.models.registry import resolve_model

    resolve_model(MODEL)  # convert once, outside every row's timing
    if "trl+alloc" in rows and resolved_allocator("auto") == "system":
        print("no tcmalloc/jemalloc/mimalloc found: the trl+alloc row would be the trl row; skipped")
        rows.remove("trl+alloc")
    machine = machine_info()
    print(describe(machine), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, order_file = Path(tmp) / "gsm8k.jsonl", Path(tmp) / "order.json"
        write_data(data, args.examples)
        order, lengths = step_order(data)
        order_file.write_text(json.dumps(order))
        if args.search:
            return search(args, Path(tmp), data, order_file)
        res = run_rows(rows, args, Path(tmp), data, order_file)
    print(f"method {args.method}, {args.examples} GSM8K examples in {len(order)} steps of {EXAMPLES_PER_STEP}, "
          f"max length {MAX_LENGTH}, 1 epoch; load average after {os.getloadavg()[0]:.2f}")
    print_table(res, args.method, machine["matmul_gflops"])
    expected = [lengths[i] for step in order for i in step]
    problems = check_rows(res, expected, len(order), STEP1_TOL, EPOCH_TOL, ("tokens", "trained_tokens", "fingerprint"))
    trl_rows = [k for k in res if k.startswith("trl")]
    ours = res.get("tunesmith") or res.get("tunesmith-fast")
    if not problems and trl_rows and ours:
        trl_row = max(trl_rows, key=lambda k: res[k]["tps"])
        trl = res[trl_row]
        if "tunesmith-fast" in res and "tunesmith" in res:
            fast = res["tunesmith-fast"]
            print(f"tunesmith-fast / {trl_row}: tokens_per_s={fast['tps'] / trl['tps']:.2f} "
                  f"peak_rss={fast['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        print(f"ratio tokens_per_s={ours['tps'] / trl['tps']:.2f} "
              f"peak_rss={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} mfu={ours['mfu']:.3f} trl_row={trl_row}")
    if problems:
        raise SystemExit("the rows did not train the same thing, so their speeds are not comparable:\n  "
                         + "\n  ".join(problems))


if __name__ == "__main__":
    sys.exit(main())
