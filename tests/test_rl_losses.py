"""Online RL losses (training/rl.py) against TRL 1.16's GRPOTrainer._compute_loss on the same fixed
completions, log-probs, old log-probs, reference log-probs and advantages (TRL's trainer is made
without __init__, with only the attributes its loss reads), loss value and gradient to 1e-5;
group advantages against TRL's formula (its own nanstd); GAE against a float64 textbook loop."""
from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.training import rl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import nanstd

B, T, MAX_NEW = 6, 7, 9
ATOL = 1e-5


def fixed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + torch.randn(B, T, generator=g) * 0.3  # old != new: some ratios leave the clip range
    ref = logps + torch.randn(B, T, generator=g) * 0.5
    adv = torch.randn(B, generator=g)
    return logps, old, ref, adv, mask


def trl_loss(loss_type: str, logps: torch.Tensor, old, ref, adv, mask, beta: float, eps: float, eps_high: float):
    """TRL's own loss code on the batch; `logps` is what its model forward would return."""
    trainer = object.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer.__dict__.update(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)}, accelerator=accelerator,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


def ours(name: str, logps, old, ref, adv, mask, beta, eps, eps_high):
    spec = rl.get_rl_loss(name)
    token_loss, metrics = rl.clipped_token_loss(logps, old, adv, mask, eps, eps_high, ref if beta else None, beta)
    return spec.aggregate(token_loss, mask, MAX_NEW) / spec.units(mask), metrics


@pytest.mark.parametrize("name", sorted(rl.RL_LOSSES))
@pytest.mark.parametrize("beta,eps,eps_high", [(0.04, 0.2, 0.2), (0.0, 0.2, 0.28), (0.1, 0.1, 0.3)])
def test_loss_and_gradient_match_trl(name, beta, eps, eps_high):
    logps, old, ref, adv, mask = fixed_batch()
    mine_in, theirs_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    mine, metrics = ours(name, mine_in, old, ref, adv, mask, beta, eps, eps_high)
    theirs, trl_metrics = trl_loss(name, theirs_in, old, ref, adv, mask, beta, eps, eps_high)
    assert torch.allclose(mine, theirs, atol=ATOL), (float(mine), float(theirs))
    mine.backward(), theirs.backward()
    assert torch.allclose(mine_in.grad, theirs_in.grad, atol=ATOL)
    assert metrics["clip_fraction"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=ATOL)
    assert 0 < metrics["clip_fraction"] < 1  # the batch does exercise the clip
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0], abs=ATOL)


def test_normalisations_differ_where_lengths_differ():
    """The three are not one formula under three names: on unequal lengths they give three values."""
    logps, old, ref, adv, mask = fixed_batch(1)
    values = {n: float(ours(n, logps, old, ref, adv, mask, 0.04, 0.2, 0.2)[0]) for n in rl.RL_LOSSES}
    assert len({round(v, 6) for v in values.values()}) == 3


def test_on_policy_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    """old = logps.detach() (one pass per rollout): the loss's gradient is -A / |o| per token (grpo)."""
    logps, _, _, adv, mask = fixed_batch(2)
    x = logps.clone().requires_grad_()
    loss, metrics = ours("grpo", x, x.detach(), None, adv, mask, 0.0, 0.2, 0.2)
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / B
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert metrics["clip_fraction"] == 0


def trl_group_advantages(rewards: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """TRL's sum_then_normalize branch of _generate_and_score_completions, verbatim in effect."""
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
    std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k)
    adv = rewards - mean
    if scale:
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_trl(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, float("nan"), 1.0, 3.0, 0.2, 0.2, 0.2, 0.2])
    assert torch.allclose(rl.group_advantages(rewards, 4, scale), trl_group_advantages(rewards, 4, scale), atol=1e-6)
    # a group whose rewards are all equal teaches nothing: advantage 0
    assert torch.all(rl.group_advantages(rewards, 4, scale)[8:] == 0)


def test_gae_matches_a_float64_loop():
    g = torch.Generator().manual_seed(3)
    logps, _, _, _, mask = fixed_batch(3)
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)
    gamma, lam = 0.99, 0.9
    adv, returns = rl.gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(mask[b].sum())
        r, v = rewards[b, :n].double().tolist(), values[b, :n].double().tolist()
        a, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            nxt = v[t + 1] if t + 1 < n else 0.0
            a = r[t] + gamma * nxt - v[t] + gamma * lam * a
            expected[t] = a
        assert torch.allclose(adv[b, :n].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
        assert torch.all(adv[b, n:] == 0)
        assert torch.allclose(returns[b, :n], adv[b, :n] + values[b, :n])


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    kl = torch.full((2, 4), 0.5)
    r = rl.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-1.05, 0.0, 0.0, 0.0]]))


def test_whiten_and_value_loss():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rl.whiten(x, m)
    assert w[0, 3] == 0 and abs(float(w[0, :3].mean())) < 1e-6 and float(w[0, :3].std()) == pytest.approx(1, abs=1e-4)
    v, old, ret = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])
    # the clipped value (0.2) is further from the return: the loss takes the larger error
    assert rl.value_loss(v, old, ret, 0.2).item() == pytest.approx(0.5 * 1.8 ** 2)
