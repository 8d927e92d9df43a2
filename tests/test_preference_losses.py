"""Preference losses (training/preference.py), each checked against TRL's own implementation on
the same batch: TRL's trainers are created without __init__ (only the attributes their loss code
reads) and run on a stand-in LM whose logits we also feed to tunesmith. TRL is a test dependency
only; nothing under src/ imports it."""
from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import ConfigError
from tunesmith.training.preference import (
    PREFERENCE_LOSSES, SeqLogps, dpo_loss, get_preference_loss, ipo_loss, kto_kl, kto_loss, orpo_loss,
    robust_dpo_loss, sequence_logps, sequence_logps_from_hidden, simpo_loss,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.utils import selective_log_softmax

VOCAB, PAD, PAIRS, LENGTH = 40, 0, 5, 12
ATOL = 1e-5


class BigramLM:
    """Stand-in causal LM: the logits at a position depend only on that position's token, so any
    input (main or KTO's KL completions) gets its own logits. With fused_lm_head=True it answers
    like TRL's fused head (trl.trainer.utils.add_fused_lm_head), via TRL's selective_log_softmax."""

    def __init__(self, seed: int = 0):
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]

    def __call__(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **_):
        logits = self.logits(input_ids)
        if not fused_lm_head:
            return SimpleNamespace(logits=logits)
        targets = labels[:, 1:]
        mask = targets != IGNORE
        log_probs = selective_log_softmax(logits[:, :-1], targets.clamp(min=0)) * mask
        zeros = torch.zeros_like(log_probs)  # per-token extras TRL only logs
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=mask & False,
                               log_sum_sq_probs=zeros)


LM = BigramLM()
ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def stand_in(trainer_cls, **attrs):
    """A TRL trainer without its __init__ (no model, data or accelerate setup)."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.__dict__.update(accelerator=ACCELERATOR, model=SimpleNamespace(training=True), aux_loss_enabled=False,
                            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                            _total_train_tokens=0, _tp_size=1, **attrs)
    return trainer


def trl_logged(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def make_batch(rows: int, seed: int, max_prompt: int = 4, paired: bool = True) -> dict[str, torch.Tensor]:
    """[prompt][completion][padding] rows. paired=True: row i and row rows/2 + i (its chosen and
    rejected, in TRL's concatenated order) share their prompt and differ in their completions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, LENGTH), generator=g)
    prompts = torch.randint(1, max_prompt + 1, (rows // 2 if paired else rows,), generator=g)
    completion = torch.zeros_like(ids)
    attention = torch.zeros_like(ids)
    for row in range(rows):
        p = int(prompts[row % len(prompts)])
        ids[row, :p] = ids[row % len(prompts), :p]
        c = int(torch.randint(1, LENGTH - p + 1, (), generator=g))
        completion[row, p:p + c] = 1
        attention[row, :p + c] = 1
    ids = ids.masked_fill(attention == 0, PAD)
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
            "labels": ids.masked_fill(completion == 0, IGNORE)}


def halves(x):
    if isinstance(x, SeqLogps):
        return tuple(SeqLogps(*parts) for parts in zip(x.sum.chunk(2), x.tokens.chunk(2)))
    return x.chunk(2)


def pair_inputs(seed: int = 0, max_prompt: int = 4):
    """A batch, tunesmith's policy log-probs (chosen, rejected) and random reference sums."""
    batch = make_batch(2 * PAIRS, seed, max_prompt)
    policy = sequence_logps(LM.logits(batch["input_ids"]), batch["labels"])
    ref = policy.sum + 3 * torch.randn(2 * PAIRS, generator=torch.Generator().manual_seed(seed + 100))
    return batch, halves(policy), halves(ref)


def assert_matches(ours: tuple[torch.Tensor, dict], trl_loss, trl_metrics: dict, keys=None):
    loss, metrics = ours
    torch.testing.assert_close(loss, torch.as_tensor(trl_loss, dtype=loss.dtype), atol=ATOL, rtol=0)
    keys = keys or ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    for key in keys:
        assert key in trl_metrics and key in metrics, key
        torch.testing.assert_close(metrics[key], torch.as_tensor(float(trl_metrics[key])), atol=ATOL, rtol=0,
                                   msg=lambda m: f"{key}: {m}")
    assert loss.abs() > 1e-3  # a non-trivial batch, so agreement means something


# --- sequence log-probabilities -------------------------------------------------------------

def brute_force_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    sums, counts = [], []
    for row_logits, row_labels in zip(logits.double(), labels):
        total, n = 0.0, 0
        for t in range(len(row_labels) - 1):
            if row_labels[t + 1] != IGNORE:
                total += torch.log_softmax(row_logits[t], -1)[row_labels[t + 1]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def test_sequence_logps_equals_float64_brute_force():
    batch = make_batch(8, seed=1)
    batch["labels"][3] = IGNORE  # a row with nothing trained
    logits = torch.randn(8, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2)) * 4
    out = sequence_logps(logits, batch["labels"])
    sums, counts = brute_force_logps(logits, batch["labels"])
    sums = torch.tensor(sums, dtype=torch.float64)
    torch.testing.assert_close(out.sum.double(), sums, atol=ATOL, rtol=0)
    assert out.tokens.tolist() == counts == (batch["completion_mask"][:, 1:].sum(-1) * (torch.arange(8) != 3)).tolist()
    torch.testing.assert_close(out.mean.double(), sums / torch.tensor(counts).clamp(min=1), atol=ATOL, rtol=0)
    assert out.sum[3] == 0 and out.mean[3] == 0


def test_sequence_logps_only_touches_trained_positions_and_skips_virtual_tokens():
    batch = make_batch(6, seed=3)
    logits = torch.randn(6, LENGTH, VOCAB, requires_grad=True)
    sequence_logps(logits, batch["labels"]).sum.sum().backward()
    predicts_trained = torch.zeros(6, LENGTH, dtype=torch.bool)
    predicts_trained[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert logits.grad[~predicts_trained].abs().max() == 0
    assert (logits.grad[predicts_trained].abs().sum(-1) > 0).all()
    # prompt tuning: 3 virtual-token positions in front of the real ones
    with_virtual = torch.cat([torch.randn(6, 3, VOCAB), logits.detach()], dim=1)
    torch.testing.assert_close(sequence_logps(with_virtual, batch["labels"]).sum,
                               sequence_logps(logits.detach(), batch["labels"]).sum)


def test_hidden_state_variant_equals_logits_variant():
    batch = make_batch(6, seed=4)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(6, LENGTH, 16)
    from_hidden = sequence_logps_from_hidden(hidden, head, batch["labels"])
    grad_hidden = torch.autograd.grad(from_hidden.sum.sum(), head.weight)[0]
    from_logits = sequence_logps(head(hidden), batch["labels"])
    grad_logits = torch.autograd.grad(from_logits.sum.sum(), head.weight)[0]
    torch.testing.assert_close(from_hidden.sum, from_logits.sum, atol=ATOL, rtol=0)
    assert torch.equal(from_hidden.tokens, from_logits.tokens)
    torch.testing.assert_close(grad_hidden, grad_logits, atol=ATOL, rtol=0)


# --- DPO family against DPOTrainer._compute_loss ---------------------------------------------

def trl_dpo(batch, ref, loss_type: str, beta: float, label_smoothing: float = 0.0):
    trainer = stand_in(DPOTrainer, precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                       use_weighting=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref
    loss = trainer._compute_loss(LM, inputs, return_outputs=False)
    return loss, trl_logged(trainer)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_dpo_matches_trl(beta):
    batch, (chosen, rejected), ref = pair_inputs(seed=5)
    assert_matches(dpo_loss(chosen, rejected, *ref, beta=beta), *trl_dpo(batch, ref, "sigmoid", beta))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(label_smoothing):
    # TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid"; its CPOTrainer.cpo_loss keeps the
    # label-smoothed sigmoid, which on reference log-ratios is exactly cDPO.
    _, (chosen, rejected), (ref_c, ref_r) = pair_inputs(seed=6)
    trainer = stand_in(CPOTrainer, loss_type="sigmoid", beta=0.2, label_smoothing=label_smoothing, alpha=0.0)
    losses, chosen_r, rejected_r = trainer.cpo_loss(chosen.sum - ref_c, rejected.sum - ref_r)
    trl_metrics = {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                   "rewards/margins": (chosen_r - rejected_r).mean(),
                   "rewards/accuracies": (chosen_r > rejected_r).float().mean()}
    ours = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.2, label_smoothing=label_smoothing)
    assert_matches(ours, losses.mean(), trl_metrics)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_robust_dpo_matches_trl(label_smoothing):
    batch, (chosen, rejected), ref = pair_inputs(seed=7)
    ours = robust_dpo_loss(chosen, rejected, *ref, beta=0.3, label_smoothing=label_smoothing)
    assert_matches(ours, *trl_dpo(batch, ref, "robust", 0.3, label_smoothing))


def test_robust_dpo_rejects_flip_rate_of_a_half():
    _, (chosen, rejected), ref = pair_inputs()
    with pytest.raises(ConfigError, match="label_smoothing"):
        robust_dpo_loss(chosen, rejected, *ref, label_smoothing=0.5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_trl(beta):
    batch, (chosen, rejected), ref = pair_inputs(seed=8)
    assert_matches(ipo_loss(chosen, rejected, *ref, beta=beta), *trl_dpo(batch, ref, "ipo", beta))


# --- SimPO against CPOTrainer, ORPO against ORPOTrainer (both from logits) -------------------

def side_by_side(batch) -> dict[str, torch.Tensor]:
    """TRL's CPO/ORPO batch layout: chosen_* and rejected_* tensors."""
    out = {}
    for key in ("input_ids", "attention_mask", "labels"):
        out[f"chosen_{key}"], out[f"rejected_{key}"] = batch[key].chunk(2)
    return out


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, label_smoothing):
    batch, (chosen, rejected), _ = pair_inputs(seed=9)
    trainer = stand_in(CPOTrainer, is_encoder_decoder=False, pad_token_id=PAD, cpo_alpha=0.0, loss_type="simpo",
                       beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, alpha=0.0)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(LM, side_by_side(batch), train_eval="train")
    assert_matches(simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing),
                   trl_loss, trl_metrics)


def trl_orpo(batch, beta: float):
    trainer = stand_in(ORPOTrainer, is_encoder_decoder=False, padding_value=PAD, beta=beta)
    return trainer.get_batch_loss_metrics(LM, side_by_side(batch), train_eval="train")


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_orpo_trainer(beta):
    # One-token prompts: position 0 is never a target, so TRL's NLL (which counts prompt tokens)
    # and ours (completion only) cover the same tokens and the whole loss must agree.
    batch, (chosen, rejected), _ = pair_inputs(seed=10, max_prompt=1)
    ours = orpo_loss(chosen, rejected, beta=beta)
    assert_matches(ours, *trl_orpo(batch, beta), keys=["rewards/chosen", "rewards/rejected", "rewards/margins",
                                                       "rewards/accuracies", "nll_loss", "log_odds_ratio",
                                                       "log_odds_chosen"])


def test_orpo_odds_ratio_term_matches_trl_with_real_prompts():
    # With longer prompts only the NLL differs (TRL also trains the prompt): the odds-ratio term,
    # the rewards and the loss minus the NLL still match.
    batch, (chosen, rejected), _ = pair_inputs(seed=11, max_prompt=4)
    loss, metrics = orpo_loss(chosen, rejected, beta=0.3)
    trl_loss, trl_metrics = trl_orpo(batch, 0.3)
    assert_matches((loss - metrics["nll_loss"], metrics), trl_loss - trl_metrics["nll_loss"], trl_metrics,
                   keys=["rewards/chosen", "rewards/rejected", "rewards/margins", "log_odds_ratio", "log_odds_chosen"])
    assert metrics["nll_loss"] != pytest.approx(trl_metrics["nll_loss"])


# --- KTO against KTOTrainer._compute_loss -------------------------------------------------------

def kto_inputs(kl_offset: float, desirable: list[bool]):
    n = len(desirable)
    batch, kl_batch = make_batch(n, seed=12, paired=False), make_batch(n, seed=13, paired=False)
    policy = sequence_logps(LM.logits(batch["input_ids"]), batch["labels"])
    kl_policy = sequence_logps(LM.logits(kl_batch["input_ids"]), kl_batch["labels"]).sum
    noise = torch.randn(2, n, generator=torch.Generator().manual_seed(14))
    ref, ref_kl = policy.sum + 3 * noise[0], kl_policy - kl_offset + noise[1]
    trl_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    trl_batch.update({f"KL_{k}": kl_batch[k] for k in ("input_ids", "attention_mask", "completion_mask")})
    trl_batch.update(label=torch.tensor(desirable), ref_logps=ref, ref_KL_logps=ref_kl)
    return trl_batch, policy, ref, kto_kl(kl_policy, ref_kl)


@pytest.mark.parametrize("kl_offset", [2.0, -2.0])  # z0 > 0, and a negative estimate clamped to 0
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl(kl_offset, weights):
    desirable = [True, False, True, True, False, False, True]
    trl_batch, policy, ref, kl = kto_inputs(kl_offset, desirable)
    trainer = stand_in(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2,
                       desirable_weight=weights[0], undesirable_weight=weights[1])
    trl_loss = trainer._compute_loss(LM, trl_batch, return_outputs=False)
    ours = kto_loss(policy, ref, torch.tensor(desirable), kl, beta=0.2, desirable_weight=weights[0],
                    undesirable_weight=weights[1])
    assert_matches(ours, trl_loss, trl_logged(trainer), keys=["rewards/chosen", "rewards/rejected",
                                                             "rewards/margins", "kl"])
    assert (ours[1]["kl"] > 0) == (kl_offset > 0)


def test_kto_with_only_desirable_examples_has_no_margin():
    _, policy, ref, kl = kto_inputs(1.0, [True] * 4)
    _, metrics = kto_loss(policy, ref, torch.ones(4, dtype=torch.bool), kl)
    assert set(metrics) == {"kl", "rewards/chosen"}


# --- the formulas respond to their inputs ------------------------------------------------------

def call(name: str, chosen, rejected, ref, **hparams):
    spec = get_preference_loss(name)
    return spec.loss(chosen, rejected, *(ref if spec.needs_reference else ()), **hparams)


PAIRED = [name for name, spec in PREFERENCE_LOSSES.items() if spec.paired]


@pytest.mark.parametrize("name", PAIRED)
def test_beta_changes_the_loss_and_swapping_flips_the_margin(name):
    _, (chosen, rejected), (ref_c, ref_r) = pair_inputs(seed=15)
    loss, metrics = call(name, chosen, rejected, (ref_c, ref_r), beta=0.2)
    assert not torch.isclose(loss, call(name, chosen, rejected, (ref_c, ref_r), beta=0.4)[0])
    swapped_loss, swapped = call(name, rejected, chosen, (ref_r, ref_c), beta=0.2)
    assert not torch.isclose(loss, swapped_loss)
    torch.testing.assert_close(swapped["rewards/margins"], -metrics["rewards/margins"])
    torch.testing.assert_close(swapped["rewards/accuracies"], 1 - metrics["rewards/accuracies"])


def test_loss_hyperparameters_change_the_loss():
    _, (chosen, rejected), ref = pair_inputs(seed=16)
    assert dpo_loss(chosen, rejected, *ref, label_smoothing=0.1)[0] != dpo_loss(chosen, rejected, *ref)[0]
    assert simpo_loss(chosen, rejected, gamma=0.2)[0] != simpo_loss(chosen, rejected, gamma=1.0)[0]
    assert robust_dpo_loss(chosen, rejected, *ref, label_smoothing=0.0)[0] == pytest.approx(
        dpo_loss(chosen, rejected, *ref)[0].item())  # no flips: robust DPO is DPO
    _, policy, kto_ref, kl = kto_inputs(1.0, [True, False, True, False])
    desirable = torch.tensor([True, False, True, False])
    base = kto_loss(policy, kto_ref, desirable, kl)[0]
    assert kto_loss(policy, kto_ref, desirable, kl, undesirable_weight=2.0)[0] != base
    assert kto_loss(policy, kto_ref, desirable, kl + 1)[0] != base  # z0 enters the loss
    assert kto_loss(policy, kto_ref, ~desirable, kl)[0] != base


def test_losses_push_chosen_up_and_rejected_down():
    _, (chosen, rejected), ref = pair_inputs(seed=17)
    for name in set(PAIRED) - {"ipo"}:  # IPO pulls the margin to a target instead: next test
        c, r = chosen.sum.clone().requires_grad_(), rejected.sum.clone().requires_grad_()
        call(name, SeqLogps(c, chosen.tokens), SeqLogps(r, rejected.tokens), ref)[0].backward()
        assert (c.grad < 0).all() and (r.grad > 0).all(), name  # gradient descent raises chosen, lowers rejected


def test_identical_pair_is_not_counted_as_correct():
    # TRL's accuracy is chosen_reward > rejected_reward, strictly: a tie is not a win.
    _, (chosen, _), (ref_c, _) = pair_inputs(seed=19)
    loss, metrics = dpo_loss(chosen, chosen, ref_c, ref_c, beta=0.1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # -log sigmoid(0)
    assert metrics["rewards/accuracies"] == 0 and metrics["rewards/margins"] == 0


def test_ipo_is_zero_exactly_at_its_target_margin():
    _, (chosen, rejected), (ref_c, ref_r) = pair_inputs(seed=18)
    beta = 0.25
    # per-token margin of log-ratios = 1 / (2 beta) for every pair
    rejected_ratio = rejected.tokens * ((chosen.sum - ref_c) / chosen.tokens - 1 / (2 * beta))
    at_target = SeqLogps(ref_r + rejected_ratio, rejected.tokens)
    assert ipo_loss(chosen, at_target, ref_c, ref_r, beta=beta)[0] == pytest.approx(0, abs=1e-8)
    assert ipo_loss(chosen, at_target, ref_c, ref_r, beta=2 * beta)[0] > 1e-3


def test_registry():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "robust", "ipo", "simpo", "orpo", "kto"}
    assert {n for n, s in PREFERENCE_LOSSES.items() if s.needs_reference} == {"sigmoid", "robust", "ipo", "kto"}
    assert [n for n, s in PREFERENCE_LOSSES.items() if not s.paired] == ["kto"]
    with pytest.raises(ConfigError, match="sigmoid"):
        get_preference_loss("dpo")
