"""Supervised fine-tuning recipe: setup -> train -> save, top to bottom.

Reads a Config, writes a run directory:
  config.yaml  manifest.json  metrics.jsonl  loss.png  adapter/  tokenizer/
"""
from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import Config, dump_config
from tunesmith.data.formats import load_conversations
from tunesmith.data.tokenize import encode_dataset, ensure_chat_template
from tunesmith.methods import apply_method, count_parameters
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.registry import resolve_model, sha256_file
from tunesmith.training.logging import MetricsLogger, plot_loss
from tunesmith.training.loop import total_steps, train
from tunesmith.training.losses import sft_loss_sum
from tunesmith.training.manifest import now_iso, versions, write_json
from tunesmith.training.rundir import run_name, staged_run_dir


def run_sft(cfg: Config) -> Path:
    started = now_iso()
    tcfg = cfg.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)

    # --- setup: model, tokenizer, data -----------------------------------------------------
    resolved = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(resolved.path)
    ensure_chat_template(tokenizer)
    train_convs, fmt = load_conversations(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    train_set = encode_dataset(tokenizer, train_convs, cfg.data.max_length, cfg.data.train)
    val_set = None
    if cfg.data.validation:
        val_convs, _ = load_conversations(cfg.data.validation, cfg.data.format, cfg.data.system_prompt)
        val_set = encode_dataset(tokenizer, val_convs, cfg.data.max_length, cfg.data.validation)
    print(f"data: {len(train_set)} training examples ({fmt} format)"
          + (f", {len(val_set)} validation" if val_set else ""), flush=True)

    model = load_model(resolved.path, trust_remote_code=cfg.model.trust_remote_code)
    model = apply_method(model, cfg.method)
    trainable, total = count_parameters(model)
    print(f"model: {resolved.id}  method: {cfg.method.name}  trainable {trainable:,} of {total:,} "
          f"parameters ({100 * trainable / total:.2f}%)", flush=True)

    name = run_name(cfg.run.name)
    resolved_cfg = cfg.model_copy(deep=True)
    resolved_cfg.run.name = name
    with staged_run_dir(cfg.run.output_dir, name) as tmp:
        (tmp / "config.yaml").write_text(dump_config(resolved_cfg), encoding="utf-8")
        # --- train ---------------------------------------------------------------------------
        steps = total_steps(len(train_set), tcfg)
        logger = MetricsLogger(tmp / "metrics.jsonl", steps)
        try:
            result = train(model, train_set, tcfg, sft_loss_sum, tokenizer.pad_token_id, logger, val_set)
        finally:
            logger.close()
        # --- save ----------------------------------------------------------------------------
        model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "tokenizer")  # includes the chat template used in training
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png")
        data_files = {p: sha256_file(Path(p)) for p in (cfg.data.train, cfg.data.validation) if p}
        write_json(tmp / "manifest.json", {
            "kind": "sft", "run_name": name, "versions": versions(),
            "model": {"id": resolved.id, "source": resolved.source, "path": str(resolved.path),
                      "sha256": resolved.sha256},
            "data": {"format": fmt, "files_sha256": data_files, "train_examples": len(train_set),
                     "validation_examples": len(val_set or [])},
            "method": cfg.method.name, "parameters": {"trainable": trainable, "total": total},
            "seed": tcfg.seed, "started": started, "finished": now_iso(),
            "steps": result.steps, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
            "train_seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 2),
            "final_loss": result.final_loss, "val_loss": result.val_loss,
        })
    final = Path(cfg.run.output_dir) / name
    print(f"run saved: {final}", flush=True)
    return final

