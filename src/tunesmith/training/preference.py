"""Preference objectives on per-sequence log-probabilities: sigmoid/conservative DPO, robust DPO,
IPO, SimPO, ORPO and KTO.

Every loss is a pure function of how likely each completion is under the policy (and, for the
losses that need one, under the frozen reference model), so a recipe computes log-probabilities
once and picks the objective by name from `PREFERENCE_LOSSES`. The formulas are the papers',
written to match TRL 1.16 exactly; each docstring names the TRL function it is checked against
in tests/test_preference_losses.py, which runs TRL's own code on the same batch.

Conventions
- Policy log-probabilities are `SeqLogps` (sum and token count per sequence), because some losses
  use the sum and others the per-token mean. Reference log-probabilities are plain [B] sums: the
  reference scores the same tokens, so the counts are the policy's.
- Each loss returns (mean over the batch, metrics). Metrics are detached 0-dim tensors: calling
  `.item()` here would synchronise the GPU on every micro-batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import ConfigError
from tunesmith.training.distributed.group import global_count, sum_scalar

Metrics = dict[str, torch.Tensor]


class SeqLogps(NamedTuple):
    """Log-probability of each sequence's trained tokens."""

    sum: torch.Tensor     # [B] summed over trained tokens
    tokens: torch.Tensor  # [B] number of trained tokens

    @property
    def mean(self) -> torch.Tensor:
        # clamp: a row truncated to no trained token scores 0 instead of nan
        return self.sum / self.tokens.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities
# ---------------------------------------------------------------------------------------------

def _trained_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:]  # position t predicts token t+1
    return targets, targets != IGNORE


def _per_sequence(rows: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> SeqLogps:
    """rows: [N, V] logits of the N trained positions, in row-major order of `keep`."""
    token_logps = -F.cross_entropy(rows.float(), targets[keep], reduction="none")
    # index_add puts each token back into its sequence's sum and keeps the autograd graph
    sums = token_logps.new_zeros(keep.shape[0]).index_add(0, keep.nonzero(as_tuple=True)[0], token_logps)
    return SeqLogps(sums, keep.sum(-1))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SeqLogps:
    """From logits [B, T', V] (T' >= T) and labels [B, T] (IGNORE where untrained).

    Only trained positions are normalised (in float32), so the extra memory is [trained, V]
    rather than a float copy of the whole [B, T, V] log-softmax."""
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual-token positions
    targets, keep = _trained_targets(labels)
    return _per_sequence(logits[:, :-1][keep], targets, keep)


def sequence_logps_from_hidden(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> SeqLogps:
    """From the decoder's last hidden states [B, T, H] and the LM head (see
    `models.load.decoder_and_head`): only trained positions go through the vocabulary projection,
    as in `training.losses.sft_loss_sum`, so prompt tokens never cost a [H x V] matmul."""
    targets, keep = _trained_targets(labels)
    return _per_sequence(head(hidden[:, :-1][keep]), targets, keep)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}


def _noisy_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Bradley-Terry NLL of preferring chosen, if the label is flipped with probability eps."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(chosen: SeqLogps, rejected: SeqLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7); label_smoothing > 0 is conservative DPO
    (cDPO, Mitchell 2023): the expected loss when labels are flipped with that probability.

    Matches TRL `DPOTrainer._compute_loss` with loss_type="sigmoid" at label_smoothing=0. TRL 1.16's
    DPOTrainer ignores label_smoothing for "sigmoid", so cDPO is matched against
    `CPOTrainer.cpo_loss` (loss_type="sigmoid") applied to the log-ratios: the same formula."""
    chosen_ratio, rejected_ratio = chosen.sum - ref_chosen, rejected.sum - ref_rejected
    losses = _noisy_logistic(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses.mean(), _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def robust_dpo_loss(chosen: SeqLogps, rejected: SeqLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (Chowdhury et al. 2024): with labels flipped with probability eps, this is an
    unbiased estimate of the clean-label DPO loss (cDPO's expected loss is not).
    It can be negative. Matches TRL `DPOTrainer._compute_loss` with loss_type="robust"."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"robust DPO needs 0 <= label_smoothing < 0.5 (a flip rate); got {label_smoothing}")
    chosen_ratio, rejected_ratio = chosen.sum - ref_chosen, rejected.sum - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses.mean(), _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def ipo_loss(chosen: SeqLogps, rejected: SeqLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17; beta is the paper's tau): regress the log-ratio margin onto
    1/(2 beta) instead of pushing it to infinity. As in TRL, each log-ratio is divided by its
    completion's token count, so the squared loss does not grow with length.

    Matches TRL `DPOTrainer._compute_loss` with loss_type="ipo", including its reward metrics,
    which stay beta * summed log-ratio (not the averaged one the loss uses)."""
    chosen_ratio, rejected_ratio = chosen.sum - ref_chosen, rejected.sum - ref_rejected
    margin = chosen_ratio / chosen.tokens.clamp(min=1) - rejected_ratio / rejected.tokens.clamp(min=1)
    losses = (margin - 1 / (2 * beta)) ** 2
    return losses.mean(), _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(chosen: SeqLogps, rejected: SeqLogps, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024): no reference model; the implicit reward is the
    length-normalised log-likelihood beta * mean log p(y|x), and chosen must beat rejected by a
    margin gamma. beta defaults to the paper's range (~2); TRL's CPOConfig default of 0.1 is CPO's.

    Matches TRL `CPOTrainer.get_batch_loss_metrics` with loss_type="simpo", cpo_alpha=0, alpha=0."""
    losses = _noisy_logistic(beta * (chosen.mean - rejected.mean) - gamma, label_smoothing)
    return losses.mean(), _pair_metrics(beta * chosen.mean, beta * rejected.mean)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, switching formula at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: SeqLogps, rejected: SeqLogps, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024, eqs. 4 and 7; beta is the paper's lambda): the SFT loss on chosen plus
    -beta * log sigmoid(log odds ratio), with odds(y) = p / (1 - p) of the per-token mean
    probability p = exp(mean log p(y|x)). No reference model.

    The NLL is over chosen's trained tokens, averaged over all of them in the batch. Matches TRL
    `ORPOTrainer.get_batch_loss_metrics` / `odds_ratio_loss`, except that TRL's NLL also counts
    prompt tokens; ours trains only the completion, like every other tunesmith objective."""
    mean_chosen, mean_rejected = chosen.mean, rejected.mean
    # log odds(y) = log p - log(1 - p); the ratio of the two odds in log space
    log_odds = (mean_chosen - mean_rejected) - (_log1mexp(mean_chosen) - _log1mexp(mean_rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    nll = -chosen.sum.sum() / chosen.tokens.sum().clamp(min=1)
    loss = nll - beta * log_sigmoid_odds.mean()
    metrics = _pair_metrics(beta * mean_chosen, beta * mean_rejected)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_sigmoid_odds.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, across_ranks: bool = False) -> torch.Tensor:
    """KTO's reference point z0 before clamping: the mean of log pi/pi_ref on mismatched
    (prompt, completion) pairs, an estimate of KL(pi || pi_ref). Detached: the paper treats z0
    as a baseline, not something to optimise.

    `across_ranks`: the mean over every process's rows (TRL gathers it), so that every process
    uses the same z0, the one a single process would compute over the same rows; every process
    must then call it at the same point (once per forward of the step). The sum is taken in
    float64 on one process or many, so the two agree to the last bit of the float32 result."""
    diff = (kl_logps - ref_kl_logps).detach()
    total, count = float(diff.double().sum()), diff.numel()
    if across_ranks:
        total, count = sum_scalar(total), global_count(count)
    return torch.tensor(total / max(count, 1), dtype=diff.dtype, device=diff.device)


def kto_loss(policy: SeqLogps, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples: desirable ones should beat the
    reference point z0 = max(kl, 0) (see `kto_kl`), undesirable ones fall below it; the loss is
    weight * (1 - value), value = sigmoid(beta * (r - z0)) or sigmoid(beta * (z0 - r)).

    `desirable`: [B] bool. The mean is over all examples. Matches TRL `KTOTrainer._compute_loss`
    with loss_type="kto"; rewards/accuracies is not defined for unpaired data."""
    ratio = policy.sum - ref
    z0 = kl.clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    rewards = beta * ratio.detach()
    metrics: Metrics = {"kl": z0}
    if desirable.any():
        metrics["rewards/chosen"] = rewards[desirable].mean()
    if not desirable.all():
        metrics["rewards/rejected"] = rewards[~desirable].mean()
    if len(metrics) == 3:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------------
# Registry: a recipe picks the objective by config name and never branches on it
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreferenceLoss:
    """How a recipe calls a loss. Paired losses take (chosen, rejected[, ref_chosen, ref_rejected]);
    unpaired ones (KTO) take (logps, ref, desirable, kl) over every example, chosen rows first."""

    loss: Callable[..., tuple[torch.Tensor, Metrics]]
    needs_reference: bool  # True: pass the reference model's summed log-probs after the policy's
    paired: bool = True    # False: KTO's unpaired examples with a desirable flag and a KL estimate
    # objective.* field -> keyword of `loss`; beta is every loss's. A field a loss does not read
    # must stay at its default (see `keywords`): a set value that does nothing is an error.
    options: tuple[tuple[str, str], ...] = ()
    # the KL estimate scores mismatched pairs under the reference as it runs, so the reference
    # must be the adapter-disabled base (no precomputed log-probs can cover those pairs)
    needs_adapter: bool = False

    def keywords(self, name: str, objective) -> dict:
        """Keyword arguments of `loss` from the objective config (a pydantic model); ConfigError
        naming any objective.* option set away from its default that this loss does not read."""
        read = dict((("beta", "beta"), *self.options))
        fields = type(objective).model_fields
        unused = [f for f in sorted(TUNABLE - set(read)) if getattr(objective, f) != fields[f].default]
        if unused:
            raise ConfigError(f"objective.loss={name} does not use {', '.join('objective.' + f for f in unused)}; "
                              f"remove {'it' if len(unused) == 1 else 'them'} (it reads "
                              f"{', '.join('objective.' + f for f in read)})")
        if not self.needs_reference and objective.reference != fields["reference"].default:
            raise ConfigError(f"objective.reference={objective.reference} does nothing with objective.loss={name}: "
                              "it uses no reference model; remove it")
        return {kw: getattr(objective, f) for f, kw in read.items()}


_SMOOTHING = ("label_smoothing", "label_smoothing")
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(dpo_loss, needs_reference=True, options=(_SMOOTHING,)),
    "robust": PreferenceLoss(robust_dpo_loss, needs_reference=True, options=(_SMOOTHING,)),
    "ipo": PreferenceLoss(ipo_loss, needs_reference=True),
    "simpo": PreferenceLoss(simpo_loss, needs_reference=False, options=(("simpo_gamma", "gamma"), _SMOOTHING)),
    "orpo": PreferenceLoss(orpo_loss, needs_reference=False),
    "kto": PreferenceLoss(kto_loss, needs_reference=True, paired=False, needs_adapter=True,
                          options=(("desirable_weight", "desirable_weight"),
                                   ("undesirable_weight", "undesirable_weight"))),
}
TUNABLE = {f for spec in PREFERENCE_LOSSES.values() for f, _ in spec.options}  # options some loss reads


def get_preference_loss(name: str) -> PreferenceLoss:
    if name not in PREFERENCE_LOSSES:
        raise ConfigError(f"preference loss '{name}' is not one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]
