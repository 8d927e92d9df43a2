"""Supervised fine-tuning recipe: setup -> train -> save, top to bottom.

Reads a Config, writes a run directory:
  config.yaml  manifest.json  metrics.jsonl  loss.png  adapter/  tokenizer/
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.data.batching import collate, collate_examples
from tunesmith.data.dataset import load_examples
from tunesmith.data.pack import describe_packing, pack_examples
from tunesmith.data.templates import apply_template
from tunesmith.data.tokenize import encode_dataset
from tunesmith.methods import count_parameters, get_method
from tunesmith.models.attention import choose_attention
from tunesmith.models.load import causal_lm_class, check_packing_isolates, load_model, load_tokenizer
from tunesmith.models.registry import resolve_model, sha256_file
from tunesmith.training.logging import MetricsLogger
from tunesmith.training.loop import total_steps, train
from tunesmith.training.losses import sft_loss_sum
from tunesmith.training.trackers import Trackers
from tunesmith.atomic import write_json
from tunesmith.training.manifest import now_iso
from tunesmith.errors import ConfigError
from tunesmith.eval.during import keep_results_of
from tunesmith.training import allocator
from tunesmith.training.distributed import is_main, world
from tunesmith.training.distributed.strategy import choose_strategy
from tunesmith.training.concurrent import has_dropout
from tunesmith.training.device import (choose_placement, compile_decoder_layers, set_malloc_mmap_threshold,
                                      trainable_in_fp32)
from tunesmith.training.run import manifest_base, open_run, save_run_outputs
from tunesmith.recipes.preflight import check_plan


def load_split(cfg: Config, spec: str):
    return load_examples(spec, cfg.data.format, cfg.data.columns, cfg.data.system_prompt, cfg.data.skip_invalid)


def load_training_examples(cfg: Config):
    if not cfg.data.sources:
        return load_split(cfg, cfg.data.train)
    from tunesmith.data.mix import load_mixture

    return load_mixture(cfg.data.sources, cfg.data.system_prompt, cfg.data.skip_invalid, cfg.train.seed)


def data_files_of(cfg: Config) -> list[Path]:
    from tunesmith.data.sources import expand_source

    specs = [s.path for s in cfg.data.sources] or [cfg.data.train]
    return [f for spec in [*specs, cfg.data.validation] if spec for f in expand_source(spec)]


def packed_if_asked(cfg: Config, model, train_set, val_set):
    """What the loop batches: the encoded examples, or with data.packing rows packed from them."""
    if not cfg.data.packing:
        return train_set, val_set
    check_packing_isolates(model)
    rows = pack_examples(train_set, cfg.data.max_length)
    print(describe_packing(train_set, rows, cfg.data.max_length), flush=True)
    return rows, val_set and pack_examples(val_set, cfg.data.max_length)


def apply_process_settings(tcfg) -> None:
    """train.threads and train.malloc_mmap_threshold: process-wide, so set before anything fills the heap."""
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if tcfg.malloc_mmap_threshold:
        set_malloc_mmap_threshold(tcfg.malloc_mmap_threshold)


def model_context(model_path: Path) -> int | None:
    """Longest sequence the model's positions cover, from its config.json (None if it does not say)."""
    import json

    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    return next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx") if config.get(k)), None)


def check_context(cfg: Config, model_path: Path) -> None:
    """data.max_length against the model's context, right after resolving the model (before any data
    is read): longer examples would train on positions the model never learned, or fail mid-run."""
    context = model_context(model_path)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is longer than the context of model.name="
                          f"{cfg.model.name} ({context} positions); set data.max_length <= {context}")


def metrics_logger(run, tcfg, steps: int) -> MetricsLogger:
    """metrics.jsonl, and train.trackers fed the same records."""
    if not is_main():  # rank 0 alone logs
        return MetricsLogger(None, steps)
    trackers = (Trackers(tcfg.trackers, run.dir, run.name, run.config.model_dump(mode="json"))
                if tcfg.trackers else None)
    return MetricsLogger(run.dir / "metrics.jsonl", steps, trackers=trackers)


def model_attention(cfg: Config, model_path: Path, placement) -> str:
    """model.attn_implementation resolved for this placement and model, printed with why."""
    attention = choose_attention(cfg.model.attn_implementation, placement.device, placement.dtype,
                                 causal_lm_class(model_path, cfg.model.trust_remote_code))
    print(f"attention: {attention.describe()}", flush=True)
    return attention.name


def prepare_model(model, cfg: Config, placement):
    """Device, precision and memory options, applied the same way for every method."""
    trainable_in_fp32(model)  # the frozen base may be bf16/fp16 (Placement.frozen_dtype)
    if not getattr(model, "is_loaded_in_4bit", False):  # bitsandbytes places 4-bit weights itself
        model.to(placement.device)
    if cfg.train.compile:  # before the memory options below: they wrap the compiled layer
        n = compile_decoder_layers(model, placement.device)
        print(f"compile: {n} decoder layers with torch.compile (compiled during the first steps)", flush=True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    elif cfg.train.activation_memory_mb:
        from tunesmith.training.memory import install_budget

        install_budget(model, cfg.train.activation_memory_mb)
    return model


def micro_batching(tcfg, placement, model, strategy=None):
    """(the loop's collate function, examples per forward or None, a description) for train.micro_batch.

    micro_batch=example keeps the step (batch_size x grad_accum examples, the same ones in the same
    order as micro_batch=batch: the loop draws the step first) and changes only how it is computed:
    the step's examples are cut into forwards of `k`, collated unpadded and run k at a time
    (training/concurrent.py), with accumulation over the rest. The summed loss is divided by the
    step's trained-token count either way, so the gradient is the batched one."""
    mode = tcfg.micro_batch
    if mode == "auto":
        mode = "example" if placement.device.type == "cpu" else "batch"
    if mode == "batch":
        if tcfg.parallel_examples:
            raise ConfigError(f"train.parallel_examples={tcfg.parallel_examples} needs train.micro_batch=example; "
                              f"train.micro_batch={tcfg.micro_batch} runs padded batches on {placement.device.type}")
        return collate, None, f"micro-batches of {tcfg.batch_size} padded examples"
    per_step = tcfg.batch_size * tcfg.grad_accum
    sharded = getattr(strategy, "shards", False)  # gathers and frees each layer's weights around every use
    if sharded and tcfg.parallel_examples > 1:
        raise ConfigError(f"train.parallel_examples={tcfg.parallel_examples} with {strategy.describe()}: a sharded "
                          "model cannot run examples in threads (each frees its gathered weights after use); remove it")
    # an explicit train.parallel_examples must divide the step (config.py checks it); auto takes the
    # largest count up to 2 on CPU that does, so every forward of the step is whole
    alone = placement.device.type == "cpu" and world()[1] == 1 and not sharded
    k = tcfg.parallel_examples or max(d for d in (1, 2 if alone else 1)
                                      if per_step % d == 0)  # several processes: they are the parallelism
    at_once = f"{k} at once"
    if k > 1 and placement.device.type != "cpu":
        at_once = f"{k} one after the other (threads only on CPU)"
    elif k > 1 and has_dropout(model):
        at_once = f"{k} one after the other (dropout draws random numbers: threads would not be reproducible)"
    return partial(collate_examples, threads=k), k, (
        f"{per_step} examples per step, each unpadded in its own forward/backward, {at_once}")


def with_task_evaluation(cfg: Config, loop_cfg, model, tokenizer, run_dir: Path, val_items, placement):
    """(loop settings, evaluator or None) for eval.during_training: cfg.eval.tasks run at every
    evaluation step, which is every checkpoint when only train.save_every is set (eval/during.py)."""
    if not (cfg.eval.during_training and cfg.eval.tasks):
        return loop_cfg, None
    from tunesmith.eval.during import task_evaluator
    from tunesmith.training.loop import evaluate_loss

    if not loop_cfg.eval_every and loop_cfg.save_every:
        loop_cfg = loop_cfg.model_copy(update={"eval_every": loop_cfg.save_every})
    base = (lambda: {"val_loss": evaluate_loss(model, val_items, sft_loss_sum, tokenizer.pad_token_id,
                                               loop_cfg.batch_size, placement)}) if val_items else None
    return loop_cfg, task_evaluator(cfg, model, tokenizer, run_dir, base)


def run_sft(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    started = now_iso()
    tcfg = cfg.train
    apply_process_settings(tcfg)
    torch.manual_seed(tcfg.seed)

    # --- setup: model, tokenizer, data -----------------------------------------------------
    resolved = resolve_model(cfg.model.name)
    check_context(cfg, resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    template = apply_template(tokenizer, cfg.data.template)
    train_data = load_training_examples(cfg)
    train_set = encode_dataset(tokenizer, train_data.examples, cfg.data.max_length, "training data",
                               cfg.data.train_on)
    val_set = None
    if cfg.data.validation:
        val_data = load_split(cfg, cfg.data.validation)
        val_set = encode_dataset(tokenizer, val_data.examples, cfg.data.max_length, cfg.data.validation,
                                 cfg.data.train_on)
    print(f"data: training {train_data.describe()}" + (f"; validation {len(val_set)}" if val_set else "")
          + f"; chat template: {template}", flush=True)

    placement = choose_placement(tcfg.precision)
    print(f"device: {placement.reason}", flush=True)
    plan = check_plan(cfg, force, [len(e.input_ids) for e in train_set],  # packed rows are max_length long
                      longest=cfg.data.max_length if cfg.data.packing else None,
                      trained=None if cfg.data.packing else [e.trained_tokens for e in train_set])
    method = get_method(cfg.method.name)
    model = load_model(resolved.path, dtype=placement.frozen_dtype(method), trust_remote_code=cfg.model.trust_remote_code,
                       attention=model_attention(cfg, resolved.path, placement), **method.load_kwargs(cfg.method))
    model = prepare_model(method.build(model, cfg.method), cfg, placement)
    trainable, total = count_parameters(model)
    print(f"model: {resolved.id}  method: {cfg.method.name}  trainable {trainable:,} of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%)", flush=True)
    train_items, val_items = packed_if_asked(cfg, model, train_set, val_set)
    strategy = choose_strategy(tcfg.distributed, method, model, placement)
    collate_fn, per_forward, how = micro_batching(tcfg, placement, model, strategy)
    print(f"batching: {how}; memory allocator: {allocator.active()}", flush=True)
    print(strategy.describe(), flush=True)
    if strategy.shards and cfg.eval.during_training:  # auto chose a sharding strategy (config_rules: explicit)
        raise ConfigError(f"eval.during_training cannot run under {strategy.describe()}: the tasks generate with the "
                          "whole model in one process, and every rank holds only a shard of it; evaluate the saved "
                          "run afterwards with `tunesmith eval`, or set train.distributed.strategy=ddp")

    with open_run(cfg, resume, prefix="sft") as run:
        # --- train ---------------------------------------------------------------------------
        steps = total_steps(len(train_items), tcfg)
        logger = metrics_logger(run, tcfg, steps)
        loop_cfg, evaluator = with_task_evaluation(cfg, tcfg, model, tokenizer, run.dir, val_items, placement)
        try:
            result = train(model, train_items, loop_cfg, sft_loss_sum, tokenizer.pad_token_id, logger, val_items,
                           run_dir=run.dir, resume=run.checkpoint, placement=placement, collate_fn=collate_fn,
                           per_forward=per_forward, evaluator=evaluator, strategy=strategy)
        finally:
            logger.close()
        if evaluator is not None and is_main():  # the evaluation of the weights being saved is the run's own
            keep_results_of(run.dir, result.best_step if tcfg.restore_best and result.best_step else result.steps)
        # --- save ----------------------------------------------------------------------------
        save_run_outputs(run, model, tokenizer, strategy)
        if not is_main():
            return run.final
        manifest = manifest_base("sft", run, resolved, (trainable, total), started, result, placement,
                                 plan and plan.record())
        manifest["data"] = {
            "formats": dict(train_data.formats), "chat_template": template, "invalid_rows": len(train_data.invalid),
            "files_sha256": {str(p): sha256_file(p) for p in data_files_of(cfg)}, "train_examples": len(train_set),
            "validation_examples": len(val_set or []), "packing": cfg.data.packing,
            "train_sequences": len(train_items)}
        manifest["val_loss"] = result.val_loss
        write_json(run.dir / "manifest.json", manifest)
    return run.final
