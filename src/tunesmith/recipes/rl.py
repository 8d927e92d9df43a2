"""Online RL recipe (objective.name=rl): setup -> (rollout -> score -> optimise) per step -> save.

Each step draws train.batch_size prompts (x train.grad_accum), samples objective.num_generations
completions of each with the policy (training/rollout.py: each completion seeded by where it is in
the run), scores them with the reward functions (training/rewards.py), and optimises the PPO-clip
objective (training/rl.py, training/rl_step.py):
- advantage group (GRPO): each completion's reward against its own group's, with the KL penalty
  to the reference in the loss;
- advantage gae (PPO): a value head on the policy's hidden states, the KL penalty in the
  per-token reward, generalised advantage estimation.

No second model in memory: the reference is the base with the adapter disabled. Under several
processes every rank samples and scores its own share of the step's prompts (a prompt's k
completions stay together, so its group advantages are computed on one rank) and the loop sums
the gradients; a completion samples the same tokens on 1 process or N, and after --resume.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.errors import ConfigError


def _check_method(cfg: Config, method) -> None:
    """What this recipe cannot do with the chosen method, before the model loads."""
    obj = cfg.objective
    if method.saves != "adapter" and obj.kl_coef:
        raise ConfigError(f"objective.kl_coef={obj.kl_coef} needs an adapter method (the reference is the base with "
                          f"the adapter disabled), not method.name={cfg.method.name}; set objective.kl_coef=0 or "
                          "method.name=lora")
    if cfg.method.name in ("prefix", "prompt"):
        raise ConfigError(f"objective rl samples with a KV cache that method.name={cfg.method.name}'s virtual tokens "
                          "do not fit; use lora, dora, qlora, ia3 or full")


def _check_strategy(strategy) -> None:
    if strategy.shards:
        raise ConfigError(f"objective rl cannot sample under {strategy.describe()}: every rank samples its own "
                          "prompts with the whole model, and a sharded model needs every rank in each forward; set "
                          "train.distributed.strategy=ddp")


def run_rl(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """setup -> train (rollouts inside the loop) -> save; the run directory has the SFT recipe's shape."""
    from tunesmith.atomic import write_json
    from tunesmith.data.prompts import encode_prompts, load_prompts
    from tunesmith.data.templates import apply_template, stop_ids
    from tunesmith.methods import count_parameters, get_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.registry import resolve_model, sha256_file
    from tunesmith.recipes.sft import (apply_process_settings, check_context, data_files_of, metrics_logger,
                                       model_attention, prepare_model)
    from tunesmith.training import rl
    from tunesmith.training.device import choose_placement
    from tunesmith.training.distributed import is_main
    from tunesmith.training.distributed.strategy import choose_strategy
    from tunesmith.training.loop import total_steps, train
    from tunesmith.training.manifest import now_iso
    from tunesmith.training.rewards import build_rewards
    from tunesmith.training.rl_step import RLLossFn, Rollout, Tally, heldout_reward
    from tunesmith.training.run import final_evaluation, manifest_base, open_run, save_run_outputs

    started, tcfg, obj, d = now_iso(), cfg.train, cfg.objective, cfg.data
    spec = rl.get_rl_loss(obj.rl_loss)
    method = get_method(cfg.method.name)
    _check_method(cfg, method)
    apply_process_settings(tcfg)
    torch.manual_seed(tcfg.seed)
    resolved = resolve_model(cfg.model.name)
    check_context(cfg, resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    template = apply_template(tokenizer, d.template)
    prompts = encode_prompts(tokenizer, load_prompts(d.train, d.columns, d.system_prompt), d.max_length, d.train)
    val = encode_prompts(tokenizer, load_prompts(d.validation, d.columns, d.system_prompt, len(prompts)),
                         d.max_length, d.validation) if d.validation else None
    try:
        rewards = build_rewards(obj.rewards, obj.reward_model, set(prompts[0].columns))
    except ValueError as exc:  # no reward function, a column the data lacks, an import that fails
        raise ConfigError(str(exc)) from None
    print(f"data: {len(prompts)} prompts" + (f", {len(val)} held out" if val else "") +
          f"; {obj.num_generations} completions each, up to {obj.max_new_tokens} tokens; rewards: "
          f"{', '.join(f'{n} x{w:g}' for n, w in zip(rewards.names, rewards.weights))}; chat template: {template}",
          flush=True)

    placement = choose_placement(tcfg.precision)
    print(f"device: {placement.reason}", flush=True)
    model = load_model(resolved.path, dtype=placement.frozen_dtype(method), trust_remote_code=cfg.model.trust_remote_code,
                       attention=model_attention(cfg, resolved.path, placement), **method.load_kwargs(cfg.method))
    model = prepare_model(method.build(model, cfg.method), cfg, placement)
    value_head = None
    if obj.advantage == "gae":  # a submodule of the model: trained, checkpointed and synchronised with it
        hidden = model.config.get_text_config().hidden_size
        model.value_head = value_head = torch.nn.Linear(hidden, 1).to(placement.device)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    trainable, total = count_parameters(model)
    print(f"model: {resolved.id}  method: {cfg.method.name}  trainable {trainable:,} of {total:,}", flush=True)
    strategy = choose_strategy(tcfg.distributed, method, model, placement)
    print(strategy.describe(), flush=True)
    _check_strategy(strategy)

    eos = set(stop_ids(tokenizer, getattr(model, "generation_config", None)))
    tally = Tally(["reward", *(f"rewards/{n}" for n in rewards.names), "completion_length", "frac_reward_zero_std",
                   "kl", "clip_fraction", *(["value_loss"] if value_head is not None else [])])
    rollout = Rollout(model, tokenizer, rewards, obj, tcfg.seed, eos, tally, spec)
    loss_fn = RLLossFn(obj, spec, rollout, tally, value_head)
    evaluated: dict = {}

    def measure(step: int | None = None) -> dict:
        # as many rows a batch as a training rollout samples: the memory is known to fit
        metrics = heldout_reward(model, tokenizer, val, rewards, eos, obj.max_new_tokens,
                                 tcfg.batch_size * obj.num_generations)
        evaluated.update(step=step, metrics=dict(metrics))
        return metrics

    def evaluator(step: int) -> dict:  # the loop's: the best checkpoint is the highest reward
        metrics = measure(step)
        return {**metrics, "select": -metrics["val_reward"]}

    with open_run(cfg, resume, prefix="rl") as run:
        logger = metrics_logger(run, tcfg, total_steps(len(prompts), tcfg))
        start = None
        if val and run.checkpoint is None:
            start = measure()
            logger.log(0, **{k: round(v, 6) for k, v in start.items()})
            print(f"step     0  held-out reward {start['val_reward']:.4f}", flush=True)
        try:
            result = train(model, prompts, tcfg, loss_fn, tokenizer.pad_token_id, logger, run_dir=run.dir,
                           resume=run.checkpoint, placement=placement, evaluator=evaluator if val else None,
                           collate_fn=rollout, strategy=strategy, on_step=rollout.at_step)
        finally:
            logger.close()
        save_run_outputs(run, model, tokenizer, strategy)
        end = None
        if val:
            end = final_evaluation(evaluated, result, tcfg, measure)
        if not is_main():
            return run.final
        manifest = manifest_base("rl", run, resolved, (trainable, total), started, result, placement)
        manifest.update({
            "objective": obj.model_dump(mode="json"),
            "data": {"chat_template": template, "prompts": len(prompts), "validation_prompts": len(val or []),
                     "files_sha256": {str(p): sha256_file(p) for p in data_files_of(cfg)}},
            "reference": "adapter-disabled base" if obj.kl_coef else "none",
            "heldout_reward": {"start": start, "end": end},
        })
        write_json(run.dir / "manifest.json", manifest)
    return run.final
