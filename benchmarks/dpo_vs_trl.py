"""tunesmith DPO vs TRL DPOTrainer (+PEFT) on the same model, pairs, steps, initial adapter and loss.

    python benchmarks/dpo_vs_trl.py [--pairs 48] [--rows trl,trl+alloc,tunesmith] [--trl KEY=VALUE ...]
        [--tunesmith a.b=VALUE ...] [--search]

Rows (each its own fresh process, one after the other, so peak RSS is its own): `trl`, DPOTrainer at
its best configuration here (TRL_BEST) with glibc's allocator; `trl+<allocator>`, the same with the
allocator `tunesmith train` preloads; `tunesmith`, its DPO recipe with its defaults. The headline
ratio is against the faster TRL row (named).

What is the same for every row
  * model: the embedded SmolLM2-135M-Instruct, fp32; sigmoid DPO, beta 0.1; LoRA r=16, alpha=32,
    dropout 0 on all linear layers; the reference is the base with the adapter disabled (or, where a
    row precomputes it, the same values computed once); AdamW lr 5e-5, constant, no warmup,
    clipping at 1.0, no weight decay, seed 0; one epoch of 4 pairs per optimizer step;
  * pairs: the first N hh-rlhf helpful-base test pairs (../shared/data; chosen != rejected) that
    fit max length 512 whole on both sides (parsed by tunesmith's hh-rlhf reader), so neither tool
    truncates: TRL's collator reports every pair it cuts, and the benchmark stops if it cuts any;
  * steps: tunesmith's own order for 4-pair steps (data.batching.epoch_batches), given to TRL as a
    dataset in that order with transformers' sequential sampler and followed by the tunesmith row
    (_same_steps.py); the initial adapter: tunesmith's LoRA builder after torch.manual_seed(0), handed
    to TRL as a PeftModel (each row reports a fingerprint of its initial weights);
  * tokens: each side counts what its own collator fed the model (TRL: the attention masks of
    DataCollatorForPreference's output, prompt + chosen and prompt + rejected; tunesmith: its
    manifest), and the benchmark stops if the rows' per-pair counts, steps, initial weights, scored
    response targets, step-1 loss (policy == reference: log 2 for both) or mean loss over the epoch
    (EPOCH_TOL) disagree. TRL also scores the newline the chat template writes after <|im_end|>;
    the benchmark masks it in TRL's batches so both score the same targets.

Timing: the training loop's wall time plus, where a row precomputes reference log-probs, the time
that took (TRL does it when the trainer is built, tunesmith before its loop starts); model loading
and tokenisation excluded. `other CPU`: what other processes used meanwhile, in cores.

--search runs TRL alone over SEARCH_GRID: batch / accumulation, precomputed reference log-probs,
gradient checkpointing, and padding-free batches where the installed TRL supports them (TRL 1.16's
DPOConfig documents padding_free as temporarily unavailable: it falls back to padding), and prints
each configuration's tokens/s, peak RSS and mean loss: how TRL_BEST is chosen.

Last line: `ratio tokens_per_s=<x> peak_rss=<y> trl_row=<name>` (tunesmith / TRL's faster row).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe, machine_info
from _same_steps import check_rows, fingerprint, follow_steps, steps_of, untrain_after_eos
from _workers import allocator_env, busy_flag, parse_overrides, resolved_allocator, run_worker, worker_main

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
MAX_LENGTH, BATCH, LR, BETA, SEED = 512, 4, 5e-5, 0.1, 0
STEP1_TOL, EPOCH_TOL = 0.005, 0.02  # relative spread of the rows' step-1 loss / mean loss over the epoch
# `python benchmarks/dpo_vs_trl.py --search --pairs 8` picked these (83.8 tokens/s, the next 74.7) on 2 cores,
# AMD EPYC avx2+avx512_bf16, fp32 matmul 159.7 GFLOP/s
TRL_BEST = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": BATCH,
            "precompute_ref_log_probs": True, "gradient_checkpointing": False}
SEARCH_GRID = {"batch": [(BATCH, 1), (2, BATCH // 2), (1, BATCH)], "precompute_ref_log_probs": [False, True],
               "gradient_checkpointing": [False, True], "padding_free": [False, True]}
ROWS = ("trl", "trl+alloc", "tunesmith")


def tunesmith_config(data: Path, out: Path, settings: dict):
    from tunesmith.config import apply_overrides, parse_config

    cfg = {"data": {"train": str(data), "max_length": MAX_LENGTH},
           "method": {"name": "lora", **LORA},
           "objective": {"name": "dpo", "loss": "sigmoid", "beta": BETA},
           "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "schedule": "constant", "warmup_steps": 0,
                     "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": SEED, "log_every": 1, "precision": "fp32"},
           "run": {"name": "bench", "output_dir": str(out)}}
    return parse_config(apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))


def write_pairs(path: Path, n: int) -> int:
    """The first n pairs that fit MAX_LENGTH whole; returns how many were passed over for length."""
    from tunesmith.data.formats import normalise
    from tunesmith.data.tokenize import encode_preference
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model

    tok = load_tokenizer(resolve_model(MODEL).path)
    out, too_long = [], 0
    with gzip.open(HH, "rt") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if rec["chosen"] == rec["rejected"]:
                continue
            (ex,) = normalise(rec, "auto", f"{HH}:{i + 1}")
            enc = encode_preference(tok, ex, MAX_LENGTH)
            if max(enc.chosen.full_length, enc.rejected.full_length) > MAX_LENGTH:
                too_long += 1
                continue
            out.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
            if len(out) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return too_long


def pair_order(data: Path) -> tuple[list[list[int]], list[int], int]:
    """(the epoch's steps as pair indices, each pair's tokens, the response targets scored in all),
    as run_dpo encodes and batches them."""
    from tunesmith.data.templates import apply_template
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.registry import resolve_model
    from tunesmith.recipes.dpo import encode_pairs
    from tunesmith.recipes.sft import load_training_examples

    cfg = tunesmith_config(data, Path(tempfile.gettempdir()), {})
    tok = load_tokenizer(resolve_model(MODEL).path)
    apply_template(tok, cfg.data.template)
    items = encode_pairs(tok, load_training_examples(cfg).examples, MAX_LENGTH, "benchmark pairs")
    if [it.index for it in items] != list(range(len(items))):
        raise SystemExit("tunesmith dropped pairs the benchmark wrote: the rows would train different pairs")
    scored = sum(it.pair.chosen.trained_tokens + it.pair.rejected.trained_tokens for it in items)
    return steps_of(items, BATCH, SEED), [it.n_tokens for it in items], scored


# --- workers (each in its own process) -------------------------------------------------------------

def tunesmith_worker(data: Path, out: Path, overrides: dict, order: list[list[int]]) -> dict:
    import tunesmith.recipes.dpo as dpo
    from tunesmith.training.logging import read_metrics

    seen = follow_steps(order)
    seen["ref_seconds"] = 0.0
    precompute = dpo.precompute_reference

    def timed_precompute(*args, **kwargs):  # objective.reference: precomputed, or full fine-tuning
        t0 = time.perf_counter()
        result = precompute(*args, **kwargs)
        seen["ref_seconds"] += time.perf_counter() - t0
        return result

    dpo.precompute_reference = timed_precompute
    run = dpo.run_dpo(tunesmith_config(data, out, overrides))
    m = json.loads((run / "manifest.json").read_text())
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return {"seconds": m["train_seconds"] + seen["ref_seconds"], "tokens": m["tokens"], "steps": m["steps"],
            "pairs": m["data"]["pairs"], "losses": losses, "computed_tokens": None, "truncated": 0,
            "settings": overrides or {"defaults": True}, **seen}


class CountingCollator:
    """Wraps TRL's DataCollatorForPreference: tokens fed per pair (chosen rows first, then rejected),
    scored targets, padded positions computed, and pairs whose prompt + response it truncated; and
    scores the targets tunesmith scores (none right after <|im_end|>: _same_steps.untrain_after_eos)."""

    def __init__(self, inner, max_length: int, eos_id: int):
        self.inner, self.max_length, self.eos_id = inner, max_length, eos_id
        self.tokens_fed, self.computed, self.truncated, self.scored, self.masked = [], 0, 0, 0, 0

    def __call__(self, examples):
        self.truncated += sum(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) > self.max_length
                              for e in examples)
        batch = self.inner(examples)
        self.masked += untrain_after_eos(batch["input_ids"], batch["completion_mask"], self.eos_id, 0)
        self.scored += int(batch["completion_mask"][:, 1:].sum())
        per_row = batch["attention_mask"].sum(dim=1).tolist()
        n = len(examples)
        self.tokens_fed += [int(per_row[i] + per_row[n + i]) for i in range(n)]
        self.computed += batch["input_ids"].numel()
        return batch


def trl_worker(data: Path, out: Path, overrides: dict, order: list[list[int]]) -> dict:
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config import MethodSection
    from tunesmith.methods import get_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model

    class Timed(DPOTrainer):
        ref_seconds = 0.0  # precompute_ref_log_probs runs while the trainer is built: timed here

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            result = super()._precompute_ref_logps(*args, **kwargs)
            Timed.ref_seconds += time.perf_counter() - t0
            return result

    path = resolve_model(MODEL).path
    torch.manual_seed(SEED)  # then load and build exactly as run_dpo does: the same initial adapter
    model = get_method("lora").build(load_model(path), MethodSection(name="lora", **LORA))
    settings = {**TRL_BEST, **overrides}
    args = DPOConfig(**{**dict(
        output_dir=str(out / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        num_train_epochs=1, max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"], max_grad_norm=1.0,
        weight_decay=0.0, seed=SEED, bf16=False, fp16=False, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, train_sampling_strategy="sequential"), **settings})
    ds = load_dataset("json", data_files=str(data), split="train")
    tok = load_tokenizer(path)
    trainer = Timed(model=model, args=args, processing_class=tok,
                    train_dataset=ds.select([i for step in order for i in step]))
    counter = CountingCollator(trainer.data_collator, MAX_LENGTH, tok.eos_token_id)
    trainer.data_collator = counter
    start = fingerprint(trainer.model)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0 + Timed.ref_seconds
    return {"seconds": seconds, "ref_seconds": Timed.ref_seconds, "tokens": sum(counter.tokens_fed),
            "tokens_fed": counter.tokens_fed, "computed_tokens": counter.computed, "truncated": counter.truncated,
            "scored": counter.scored, "masked_after_eos": counter.masked,
            "steps": trainer.state.global_step, "pairs": len(ds), "fingerprint": start, "settings": settings,
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}


# --- the parent --------------------------------------------------------------------------------------

def run_row(row: str, args, tmp: Path, data: Path, order_file: Path, trl_overrides: list[str], env: dict) -> dict:
    kind = "trl" if row.startswith("trl") else "tunesmith"
    overrides = [x for o in (trl_overrides if kind == "trl" else args.tunesmith) for x in (f"--{kind}", o)]
    r = run_worker(row, __file__, ["--worker", kind, "--data", str(data), "--out", str(tmp / row.replace("+", "_")),
                         "--order", str(order_file), *overrides], env)
    r["mean_loss"] = sum(r["losses"]) / max(len(r["losses"]), 1)
    r["tps"] = r["tokens"] / r["seconds"]
    return r


def search_configs() -> list[dict]:
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["padding_free"].metadata.get("help", "")
    padding_free = "temporarily unavailable" not in help_text.lower()
    if not padding_free:
        print("padding_free left out of the search: the installed TRL says it is temporarily unavailable "
              "(it falls back to padding)")
    configs = []
    for (batch, accum), pre, gc, pf in itertools.product(*SEARCH_GRID.values()):
        if pf and (batch == 1 or not padding_free):
            continue  # one pair per forward has no padding to remove
        configs.append({"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum,
                        "precompute_ref_log_probs": pre, "gradient_checkpointing": gc, "padding_free": pf})
    return configs


def search(args, tmp: Path, data: Path, order_file: Path) -> None:
    """TRL alone over SEARCH_GRID with glibc's allocator: how TRL_BEST is chosen."""
    res = {}
    for i, cfg in enumerate(search_configs()):
        overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.items()] + args.trl
        r = res[f"trl#{i}"] = run_row(f"trl#{i}", args, tmp, data, order_file, overrides, allocator_env("system"))
        ref = f" (reference log-probs {r['ref_seconds']:.1f} s of it)" if r["ref_seconds"] else ""
        print(f"trl#{i}: {r['tps']:7.1f} tok/s{ref}  peak {r['peak_rss_mb']:6.0f} MB  mean loss {r['mean_loss']:.4f}  "
              f"{json.dumps(r['settings'])}{busy_flag(r)}", flush=True)
    best = max(res, key=lambda k: res[k]["tps"])
    print(f"fastest: {best} {json.dumps(res[best]['settings'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=48, help=f"a multiple of {BATCH}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="DPOConfig override")
    ap.add_argument("--tunesmith", action="append", default=[], metavar="a.b=VALUE", help="config override")
    ap.add_argument("--search", action="store_true", help="search TRL's fastest configuration instead")
    ap.add_argument("--worker", choices=["tunesmith", "trl"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--order", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker_main({"tunesmith": tunesmith_worker, "trl": trl_worker}, args.worker, args.data, args.out,
                    parse_overrides(getattr(args, args.worker)), json.loads(args.order.read_text()))
        return
    rows = args.rows.split(",")
    if set(rows) - set(ROWS) or args.pairs % BATCH or args.pairs <= 0:
        raise SystemExit(f"--rows takes {', '.join(ROWS)}; --pairs a positive multiple of {BATCH}")
    if not HH.is_file():
        raise SystemExit(f"{HH} is missing: the benchmark needs ../shared/data")
    from tunesmith.models.registry import resolve_model

    resolve_model(MODEL)  # convert once, outside every row's timing
    alloc_choice = parse_overrides(args.tunesmith).get("train.allocator", "auto")
    if "trl+alloc" in rows and resolved_allocator(alloc_choice) == "system":
        print("no tcmalloc/jemalloc/mimalloc found: the trl+alloc row would be the trl row; skipped")
        rows.remove("trl+alloc")
    machine = machine_info()
    print(describe(machine), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, order_file = Path(tmp) / "pairs.jsonl", Path(tmp) / "order.json"
        too_long = write_pairs(data, args.pairs)
        order, pair_tokens, scored = pair_order(data)
        order_file.write_text(json.dumps(order))
        print(f"sigmoid DPO, {len(pair_tokens)} hh-rlhf pairs ({too_long} longer than {MAX_LENGTH} tokens passed over) "
              f"in {len(order)} steps of {BATCH}, {sum(pair_tokens)} tokens", flush=True)
        if args.search:
            return search(args, Path(tmp), data, order_file)
        res = {}
        for row in rows:
            env = allocator_env("system" if row == "trl" else alloc_choice)
            name = f"trl+{env['TUNESMITH_ALLOCATOR']}" if row == "trl+alloc" else row
            res[name] = run_row(name, args, Path(tmp), data, order_file, args.trl, env)
    for row, r in res.items():
        print(f"  {row}: {json.dumps(r['settings'])}; allocator {r['allocator']}; initial weights {r['fingerprint']}"
              + (f"; targets after EOS masked {r['masked_after_eos']}" if "masked_after_eos" in r else ""))
    print(f"{'row':<16}{'steps':>6}{'tokens':>7}{'padded':>7}{'seconds':>8}{'ref s':>6}{'tok/s':>7}{'peak MB':>8}"
          f"{'step-1 loss':>12}{'mean loss':>10}{'process s':>10}{'other CPU':>10}")
    for row, r in res.items():
        padded = r["computed_tokens"] if r["computed_tokens"] is not None else "-"
        print(f"{row:<16}{r['steps']:>6}{r['tokens']:>7}{padded:>7}{r['seconds']:>8.1f}{r['ref_seconds']:>6.1f}"
              f"{r['tps']:>7.1f}{r['peak_rss_mb']:>8.0f}{r['losses'][0] if r['losses'] else float('nan'):>12.4f}"
              f"{r['mean_loss']:>10.4f}{r['process_seconds']:>10.1f}{r['other_cores']:>9.2f}c{busy_flag(r)}")
    problems = check_rows(res, [pair_tokens[i] for step in order for i in step], len(order), STEP1_TOL, EPOCH_TOL)
    problems += [f"{row}: truncated {r['truncated']} pairs" for row, r in res.items() if r["truncated"]]
    problems += [f"{row}: scored {r['scored']} response targets, tunesmith {scored}" for row, r in res.items()
                 if r.get("scored", scored) != scored]
    trl_rows = [k for k in res if k.startswith("trl")]
    if not problems and trl_rows and "tunesmith" in res:
        trl_row = max(trl_rows, key=lambda k: res[k]["tps"])
        ours, trl = res["tunesmith"], res[trl_row]
        print(f"ratio tokens_per_s={ours['tps'] / trl['tps']:.2f} "
              f"peak_rss={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} trl_row={trl_row}")
    if problems:
        raise SystemExit("the rows did not train the same thing, so their speeds are not comparable:\n  "
                         + "\n  ".join(problems))


if __name__ == "__main__":
    sys.exit(main())
