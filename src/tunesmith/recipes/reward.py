"""Reward model recipe (objective.name=reward): setup -> train -> save, top to bottom.

A sequence-scoring head on the base (training/reward_model.py) trained on prompt/chosen/rejected
pairs with the Bradley-Terry loss; held-out pair accuracy logged; saved so that `tunesmith score`,
`tunesmith eval` and the RL recipe (objective.reward_model) load it.

The pairs are the DPO recipe's (recipes/dpo.py: encode_pairs, collate_pairs, chosen rows then
rejected rows in one forward), each side cut after its reply's end-of-turn token, where it is
scored. The run directory has the DPO run's shape.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.errors import DataError
from tunesmith.recipes.dpo import PairItem, PreferenceLoss, _batches, collate_pairs, encode_pairs
from tunesmith.training.distributed.group import map_shared
from tunesmith.training.reward_model import bradley_terry_loss, scored, scores_of

_PAIRS = "_pairs"  # a metrics record's weight, as recipes/dpo.py's


class RewardLoss:
    """loss_fn for the training loop: (Bradley-Terry loss x pairs, pairs), with per-step metrics."""

    def __init__(self, center: float):
        self.center = center
        self._metrics: list[dict] = []

    def __call__(self, model, batch: dict):
        n = batch["units"]
        scores = scores_of(model, batch)
        loss, metrics = bradley_terry_loss(scores[:n], scores[n:], batch.get("margin"), self.center)
        self._metrics.append({**{k: float(v) for k, v in metrics.items()}, _PAIRS: n})
        return loss * n, n  # a sum over pairs: the loop divides by the step's pairs on every rank

    pop_metrics = PreferenceLoss.pop_metrics  # means over the logged steps' pairs, added over ranks


def reward_pairs(tokenizer, examples, max_length: int, source: str, first_index: int = 0) -> list[PairItem]:
    """The DPO recipe's pairs, each side cut after the token it is scored at."""
    items = encode_pairs(tokenizer, examples, max_length, source, first_index)
    for it in items:
        where = examples[it.index - first_index].location
        it.pair.chosen, it.pair.rejected = scored(it.pair.chosen, where), scored(it.pair.rejected, where)
        it.partner = None  # KTO's mismatched rows: not used here
    return items


def read_margins(spec: str, column: str, items: list[PairItem], examples, first_index: int = 0) -> dict[int, float]:
    """objective.margin_column of each pair, from the raw rows of `spec` (the data loader keeps only
    the fields of its formats), keyed by pair index."""
    from tunesmith.data.sources import iter_records

    wanted = {examples[it.index - first_index].location: it.index for it in items}
    margins: dict[int, float] = {}
    for raw in iter_records(spec):
        if raw.where not in wanted:
            continue
        value = (raw.record or {}).get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            what = "has no column" if value is None else f"has {value!r} in column"
            raise DataError(f"{raw.where}: the row {what} '{column}' (objective.margin_column); every pair needs "
                            "a finite number there")
        margins[wanted[raw.where]] = float(value)
    missing = [where for where, i in wanted.items() if i not in margins]
    if missing:
        raise DataError(f"{missing[0]}: no margin found in {spec} for this pair (objective.margin_column={column}); "
                        "objective.margin_column reads data.train and data.validation files, not data.sources mixtures")
    return margins


def collate_reward(margins: dict[int, float] | None):
    def collate(group: list[PairItem], pad_id: int) -> dict:
        batch = collate_pairs(group, pad_id)
        if margins is not None:
            batch["margin"] = torch.tensor([margins[it.index] for it in group])
        return batch
    return collate


@torch.no_grad()
def pair_accuracy(model, items: list[PairItem], loss: RewardLoss, collate, pad_id: int, batch_size: int) -> dict:
    """Held-out pair loss, accuracy (chosen scored above rejected) and mean score margin. Under several
    processes each batch is scored by one of them and the sums gathered (every process gets them)."""
    def score(group: list[PairItem]) -> tuple[float, int, float, float]:
        value, n = loss(model, collate(group, pad_id))
        m = loss._metrics[-1]
        return float(value), n, m["rewards/accuracies"] * n, m["rewards/margins"] * n

    was = model.training
    model.eval()
    try:
        scored_batches = map_shared(score, _batches(items, batch_size))
    finally:
        loss._metrics.clear()
        model.train(was)
    total, n_all, correct, margin = (sum(c) for c in zip(*scored_batches)) if scored_batches else (0.0, 0, 0.0, 0.0)
    n_all = max(n_all, 1)
    return {"val_loss": total / n_all, "val_preference_accuracy": correct / n_all, "val_margin": margin / n_all}


def run_reward(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """setup -> train -> save; the run directory has the DPO recipe's shape."""
    from tunesmith.atomic import write_json
    from tunesmith.data.templates import apply_template
    from tunesmith.errors import ConfigError
    from tunesmith.methods import count_parameters, get_method
    from tunesmith.models.load import load_score_model, load_tokenizer
    from tunesmith.models.registry import resolve_model, sha256_file
    from tunesmith.recipes.preflight import check_plan, refuse_sharded_validation
    from tunesmith.recipes.sft import (apply_process_settings, check_context, data_files_of, load_split,
                                       load_training_examples, metrics_logger, model_attention, prepare_model)
    from tunesmith.training.device import choose_placement
    from tunesmith.training.distributed import is_main
    from tunesmith.training.distributed.strategy import choose_strategy
    from tunesmith.training.loop import total_steps, train
    from tunesmith.training.manifest import now_iso
    from tunesmith.training.reward_model import use_reward_pad
    from tunesmith.training.run import final_evaluation, manifest_base, open_run, save_run_outputs

    started, tcfg, obj = now_iso(), cfg.train, cfg.objective
    method = get_method(cfg.method.name)
    if obj.margin_column and cfg.data.sources:
        raise ConfigError("objective.margin_column reads the margins from data.train's rows; with data.sources "
                          "put the mixture in one file (tunesmith data prepare) or drop the margins")
    apply_process_settings(tcfg)
    torch.manual_seed(tcfg.seed)  # the score head starts random: the seed makes it the same every run
    resolved = resolve_model(cfg.model.name)
    check_context(cfg, resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    template = apply_template(tokenizer, cfg.data.template)
    pad_id = use_reward_pad(tokenizer)
    data = load_training_examples(cfg)
    items = reward_pairs(tokenizer, data.examples, cfg.data.max_length, "training data")
    val_examples = load_split(cfg, cfg.data.validation).examples if cfg.data.validation else None
    val = (reward_pairs(tokenizer, val_examples, cfg.data.max_length, cfg.data.validation,
                        first_index=len(data.examples)) if val_examples else None)
    margins = None
    if obj.margin_column:
        margins = read_margins(cfg.data.train, obj.margin_column, items, data.examples)
        if val:
            margins.update(read_margins(cfg.data.validation, obj.margin_column, val, val_examples, len(data.examples)))
    print(f"data: {len(items)} preference pairs" + (f", {len(val)} held out" if val else "") +
          f"; scored at each reply's last token (pad token id {pad_id}); chat template: {template}", flush=True)

    placement = choose_placement(tcfg.precision)
    print(f"device: {placement.reason}", flush=True)
    plan = check_plan(cfg, force, [it.n_tokens for it in items],  # a pair's tokens: chosen + rejected
                      longest=max((len(it.input_ids) for it in items), default=0))
    model = load_score_model(resolved.path, dtype=placement.frozen_dtype(method),
                             trust_remote_code=cfg.model.trust_remote_code,
                             attention=model_attention(cfg, resolved.path, placement), **method.load_kwargs(cfg.method))
    model.config.pad_token_id = pad_id  # transformers reads each row's score at its last non-pad token
    model = prepare_model(method.build(model, cfg.method, task_type="SEQ_CLS"), cfg, placement)
    trainable, total = count_parameters(model)
    print(f"model: {resolved.id} + score head  method: {cfg.method.name}  trainable {trainable:,} of {total:,}",
          flush=True)
    loss_fn = RewardLoss(obj.center_rewards)
    collate = collate_reward(margins)
    strategy = choose_strategy(tcfg.distributed, method, model, placement)
    print(strategy.describe(), flush=True)
    refuse_sharded_validation(strategy, val, "pair accuracy")

    evaluated: dict = {}  # the last evaluation's step and numbers: the same on every process

    def evaluator(step: int | None = None) -> dict:
        metrics = pair_accuracy(model, val, loss_fn, collate, pad_id, tcfg.batch_size)
        evaluated.update(step=step, metrics=dict(metrics))
        return metrics

    with open_run(cfg, resume, prefix="reward") as run:
        logger = metrics_logger(run, tcfg, total_steps(len(items), tcfg))
        start = evaluator() if val and run.checkpoint is None else None
        if start:
            logger.log(0, **{k: round(v, 6) for k, v in start.items()})
            print(f"step     0  held-out pair accuracy {start['val_preference_accuracy']:.3f} (random score head)",
                  flush=True)
        try:
            result = train(model, items, tcfg, loss_fn, pad_id, logger, val, run_dir=run.dir, resume=run.checkpoint,
                           placement=placement, evaluator=evaluator if val else None, collate_fn=collate,
                           strategy=strategy)
        finally:
            logger.close()
        save_run_outputs(run, model, tokenizer, strategy)  # the tokenizer carries the pad token scored with
        end = None
        if val:
            end = final_evaluation(evaluated, result, tcfg, evaluator)
        if not is_main():
            return run.final
        manifest = manifest_base("reward", run, resolved, (trainable, total), started, result, placement,
                                 plan and plan.record())
        manifest.update({
            "objective": obj.model_dump(),
            "data": {"formats": dict(data.formats), "chat_template": template, "pairs": len(items),
                     "validation_pairs": len(val or []),
                     "files_sha256": {str(p): sha256_file(p) for p in data_files_of(cfg)}},
            "reward_model": {"pad_token_id": pad_id, "scored_at": "the last token of the reply's turn"},
            "preference_accuracy": {"start": start, "end": end},
            "val_loss": result.val_loss,  # the held-out pair loss (`tunesmith runs` lists it)
        })
        write_json(run.dir / "manifest.json", manifest)
    return run.final
