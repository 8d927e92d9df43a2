"""Online RL losses: advantages (group-relative or GAE) and the PPO-clip objective with a KL penalty.

Shapes: B completions (a prompt's k completions are consecutive rows), T completion positions;
per-token tensors are [B, T] with `mask` 1 on a completion's tokens (its end-of-turn included),
0 on padding. Log-probs are of the sampled token at each position.

Normalisations (objective.rl_loss), each matched against TRL 1.16 `GRPOTrainer._compute_loss` on
the same batch in tests/test_rl_losses.py:
- grpo:    mean over completions of each completion's mean per-token loss (long completions count
           no more than short ones per completion, so each token of a long one counts less);
- dr_grpo: sum of per-token losses / (completions x max_new_tokens): no length bias (Liu et al. 2025);
- dapo:    sum of per-token losses / all completion tokens of the step (token-level, Yu et al. 2025).
Each gives a micro-batch's summed loss and its units: the training loop divides the step's summed
loss by the step's units counted over every micro-batch and rank, so accumulation and data parallelism give the
loss of one batch on one process (DESIGN principle 9).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunesmith.errors import ConfigError

Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each completion's reward minus its group's mean, divided by the group's std (Bessel
    corrected, + 1e-4, as TRL) when `scale`. NaN rewards (unscorable completions) are left out of
    their group's mean and std and get advantage 0. rewards: [n * k], groups consecutive."""
    grouped = rewards.view(-1, k)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = grouped - mean
    if scale:
        count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
        std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each completion's tokens:
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma lam A_{t+1}.
    rewards, values, mask: [B, T]; returns (advantages, returns = advantages + values), 0 on padding.
    Completion tokens are contiguous from position 0 (right padding)."""
    values = values * mask
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Masked standardisation (mean 0, std 1 over the masked entries), as PPO normalises advantages."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward (Ziegler et al. 2019; Ouyang et al. 2022): -kl_coef x (log pi - log
    pi_ref) at every token, and the sequence's score added at its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


# ---------------------------------------------------------------------------------------------
# The clipped objective
# ---------------------------------------------------------------------------------------------

def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3; TRL's):
    unbiased, always >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       epsilon: float, epsilon_high: float | None = None, ref_logps: torch.Tensor | None = None,
                       kl_coef: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Per-token PPO-clip loss -min(ratio A, clip(ratio, 1-eps, 1+eps_high) A) (+ kl_coef x k3 KL to
    the reference when given). advantages: [B] (one per completion) or [B, T]."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        region = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        metrics: Metrics = {"clip_fraction": (region.float() * mask).sum() / n}
    if ref_logps is not None and kl_coef:
        kl = k3_kl(logps, ref_logps)
        loss = loss + kl_coef * kl
        metrics["kl"] = (kl.detach() * mask).sum() / n
    return loss, metrics


def _grpo(token_loss, mask, max_new_tokens):
    return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _dr_grpo(token_loss, mask, max_new_tokens):
    return (token_loss * mask).sum() / max_new_tokens


def _dapo(token_loss, mask, max_new_tokens):
    return (token_loss * mask).sum()


@dataclass(frozen=True)
class RLLoss:
    """How per-token losses become the step's loss: aggregate(token_loss, mask, max_new_tokens) is
    the micro-batch's summed loss, and the loop divides the step's sum by its units over every
    micro-batch and rank: completion tokens (per_token) or completions."""
    aggregate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    per_token: bool
    summary: str

    def units(self, mask: torch.Tensor) -> int:
        return int(mask.sum()) if self.per_token else mask.shape[0]


RL_LOSSES: dict[str, RLLoss] = {
    "grpo": RLLoss(_grpo, False, "mean over completions of each one's mean token loss (GRPO; TRL loss_type=grpo)"),
    "dr_grpo": RLLoss(_dr_grpo, False, "token losses summed / (completions x max_new_tokens) (Dr. GRPO)"),
    "dapo": RLLoss(_dapo, True, "token losses summed / the step's completion tokens (DAPO)"),
}


def get_rl_loss(name: str) -> RLLoss:
    if name not in RL_LOSSES:
        raise ConfigError(f"objective.rl_loss '{name}' is not one of {sorted(RL_LOSSES)}")
    return RL_LOSSES[name]


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped within `clip`
    of the rollout's value (PPO as in TRL's PPOTrainer, cliprange_value)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
