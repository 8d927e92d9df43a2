"""One online RL step's parts, used by recipes/rl.py: the rollout (the loop's collate_fn: sample,
score, advantages), the loss (the loop's loss_fn: PPO-clip with the KL penalty, or with a value
head and GAE), the per-step metrics, and the held-out reward.

One optimisation pass per rollout (TRL's num_iterations=1): the old policy is the policy that
sampled, so the ratio is 1 at the step and the clip bounds it against nothing yet; the objective
is written for old != new (tests/test_rl_losses.py checks it so against TRL).
"""
from __future__ import annotations

import time
import torch

from tunesmith.data.prompts import PromptRow
from tunesmith.training import rl
from tunesmith.training.distributed import sum_scalar
from tunesmith.training.distributed.group import map_shared, world
from tunesmith.training.rollout import SampleStats, completion_batch, completion_logps, row_seed, sample


class Tally:
    """Sums and counts of per-step metrics since the last log, added over ranks when popped (every
    rank pops at the same steps and holds the same keys)."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.reset()

    def reset(self):
        self.sum = {k: 0.0 for k in self.keys}
        self.sq = {k: 0.0 for k in self.keys}
        self.n = {k: 0.0 for k in self.keys}

    def add(self, key: str, values: torch.Tensor, weight: torch.Tensor | None = None):
        values = values.detach().double().flatten()
        keep = ~torch.isnan(values)
        w = torch.ones_like(values) if weight is None else weight.detach().double().flatten()
        self.sum[key] += float((values[keep] * w[keep]).sum())
        self.sq[key] += float((values[keep] ** 2 * w[keep]).sum())
        self.n[key] += float(w[keep].sum())

    def pop(self, with_std: set[str]) -> dict:
        out = {}
        for k in self.keys:
            n, s, q = sum_scalar(self.n[k]), sum_scalar(self.sum[k]), sum_scalar(self.sq[k])
            if n:
                mean = s / n
                out[k] = round(mean, 6)
                if k in with_std and n > 1:
                    out[f"{k}_std"] = round((max(q / n - mean * mean, 0.0) * n / (n - 1)) ** 0.5, 6)
        self.reset()
        return out


class Rollout:
    """collate_fn of the loop: a micro-batch of prompts -> their k sampled, scored completions as
    one training batch (advantages included). `at_step` tells it the step it samples for."""

    def __init__(self, model, tokenizer, rewards, obj, seed: int, eos: set[int], tally: Tally, loss: rl.RLLoss):
        self.model, self.tokenizer, self.rewards, self.obj, self.seed = model, tokenizer, rewards, obj, seed
        self.eos, self.tally, self.loss, self.step = eos, tally, loss, 0
        self.gen, self.reward_seconds = SampleStats(), 0.0

    def at_step(self, step: int) -> None:
        self.step = step

    def __call__(self, group: list[PromptRow], pad_id: int) -> dict:
        k, obj = self.obj.num_generations, self.obj
        was = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            completions = sample(self.model, [r.input_ids for r in group],
                                 [row_seed(self.seed, self.step, r.index, j) for r in group for j in range(k)],
                                 obj.max_new_tokens, self.eos, pad_id, obj.temperature, obj.top_p, self.gen, repeats=k)
        finally:
            self.model.train(was)
        t0 = time.perf_counter()
        per_fn = self.rewards([r.given for r in group for _ in range(k)],
                              self.tokenizer.batch_decode(completions, skip_special_tokens=True),
                              {c: [r.columns[c] for r in group for _ in range(k)] for c in group[0].columns},
                              completion_ids=completions)
        self.reward_seconds += time.perf_counter() - t0
        total = torch.tensor(self.rewards.total(per_fn), dtype=torch.float32)
        batch = completion_batch(group, completions, k, pad_id)
        batch["scores"] = torch.nan_to_num(total, nan=0.0)
        batch["advantages"] = rl.group_advantages(total, k, obj.scale_rewards == "group")
        batch["units"] = self.loss.units(batch["mask"])
        t = self.tally
        t.add("reward", total)
        for name, values in zip(self.rewards.names, per_fn):
            t.add(f"rewards/{name}", torch.tensor(values, dtype=torch.float64))
        t.add("completion_length", torch.tensor([len(c) for c in completions], dtype=torch.float64))
        t.add("frac_reward_zero_std", (total.view(-1, k).nan_to_num(0).std(dim=1) < 1e-6).double())
        return batch


def _whiten_groups(adv: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """GAE advantages standardised within each prompt's k completions (a group lives on one rank,
    so the result does not depend on how processes split the step)."""
    out = [rl.whiten(a, m) for a, m in zip(adv.split(k), mask.split(k))]
    return torch.cat(out)


class RLLossFn:
    """loss_fn of the loop: the PPO-clip loss of a rollout batch, (summed loss, units)."""

    # about 0 at every step (advantages are centred per group): the loop's spike warning, a ratio
    # to the recent mean, would fire on noise; the reward is what to watch
    loss_is_quality = False

    def __init__(self, obj, spec: rl.RLLoss, rollout: Rollout, tally: Tally, value_head=None):
        self.obj, self.spec, self.rollout, self.tally, self.value_head = obj, spec, rollout, tally, value_head
        self.train_tokens, self._step_tokens, self.last_pop = 0, 0, time.perf_counter()

    def step_tokens(self) -> int:
        """The step's prompt and completion tokens over every rank (the loop's token count)."""
        n, self._step_tokens = sum_scalar(self._step_tokens), 0
        return int(n)

    def __call__(self, model, batch: dict):
        obj = self.obj
        logps, values = completion_logps(model, batch, obj.temperature, self.value_head)
        mask = batch["mask"].to(logps.dtype)
        old = logps.detach()  # the policy that sampled (one pass per rollout)
        ref = None
        if obj.kl_coef:
            with torch.no_grad(), model.disable_adapter():
                ref, _ = completion_logps(model, batch, obj.temperature)
        if obj.advantage == "gae":
            kl = old - ref if ref is not None else torch.zeros_like(old)
            rewards = rl.token_rewards(batch["scores"].to(logps.dtype), kl, mask, obj.kl_coef)
            adv, returns = rl.gae(rewards, values.detach(), mask, obj.gamma, obj.lam)
            token_loss, metrics = rl.clipped_token_loss(logps, old, _whiten_groups(adv, mask, obj.num_generations),
                                                        mask, obj.epsilon, obj.epsilon_high)
            vloss = rl.value_loss(values, values.detach(), returns, clip=obj.epsilon)
            token_loss = token_loss + obj.vf_coef * vloss
            self.tally.add("value_loss", (vloss * mask).sum() / mask.sum().clamp(min=1))
            if ref is not None:
                metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        else:
            token_loss, metrics = rl.clipped_token_loss(logps, old, batch["advantages"].to(logps.dtype), mask,
                                                        obj.epsilon, obj.epsilon_high, ref, obj.kl_coef)
        tokens = mask.sum()
        for key, value in metrics.items():
            self.tally.add(key, value, tokens)
        # each completion with its prompt, no padding (as TRL counts them; a group's prompt is read
        # once, so this is the work the step stands for, not the tokens it ran)
        tokens_in = int(batch["attention_mask"].sum())
        self.train_tokens += tokens_in
        self._step_tokens += tokens_in
        return self.spec.aggregate(token_loss, mask, obj.max_new_tokens), batch["units"]

    def pop_metrics(self) -> dict:
        """The logged steps' metrics, every rank's rollouts together; tokens/s of generation and of
        training (forward, backward and the optimizer: the step's time not spent sampling or scoring)."""
        now, r = time.perf_counter(), self.rollout
        size = world()[1]
        elapsed = sum_scalar(now - self.last_pop) / size
        gen_s, reward_s = sum_scalar(r.gen.seconds) / size, sum_scalar(r.reward_seconds) / size
        gen_tokens, train_tokens = sum_scalar(r.gen.tokens), sum_scalar(self.train_tokens)
        out = self.tally.pop({"reward", *(f"rewards/{n}" for n in r.rewards.names)})
        out.update(generation_tokens_per_s=round(gen_tokens / max(gen_s, 1e-9), 2),
                   train_tokens_per_s=round(train_tokens / max(elapsed - gen_s - reward_s, 1e-9), 2),
                   generation_seconds=round(gen_s, 3), reward_seconds=round(reward_s, 3),
                   train_seconds=round(elapsed - gen_s - reward_s, 3))
        r.gen, r.reward_seconds, self.train_tokens, self.last_pop = SampleStats(), 0.0, 0, now
        return out


@torch.no_grad()
def heldout_reward(model, tokenizer, rows: list[PromptRow], rewards, eos: set[int], max_new_tokens: int,
                   batch_size: int) -> dict:
    """Mean reward of greedy completions to held-out prompts, overall and per function (each prompt
    scored by one process, the results gathered on every one)."""
    was = model.training
    model.eval()

    def score(group: list[PromptRow]) -> list[list[float]]:
        completions = sample(model, [r.input_ids for r in group], None, max_new_tokens, eos,
                             tokenizer.pad_token_id)
        per_fn = rewards([r.given for r in group], tokenizer.batch_decode(completions, skip_special_tokens=True),
                         {c: [r.columns[c] for r in group] for c in group[0].columns}, completion_ids=completions)
        total = torch.tensor(rewards.total(per_fn), dtype=torch.float64)
        return [[float(total[i]), *(float(v[i]) for v in per_fn)] for i in range(len(group))]

    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    try:
        scored = [row for part in map_shared(score, [ordered[s:s + batch_size]
                                                    for s in range(0, len(ordered), batch_size)]) for row in part]
    finally:
        model.train(was)
    columns = torch.tensor(scored, dtype=torch.float64).T
    out = {"val_reward": float(columns[0].nan_to_num(0.0).mean())}
    for name, col in zip(rewards.names, columns[1:]):
        out[f"val_rewards/{name}"] = float(col.nanmean()) if (~col.isnan()).any() else float("nan")
    return out
