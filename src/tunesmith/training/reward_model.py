"""Reward models: a sequence-scoring head on a causal LM, trained on preference pairs.

The model is transformers' AutoModelForSequenceClassification with num_labels=1 (what TRL's
RewardTrainer trains, what vLLM and TGI serve as reward models): the decoder plus a bias-free
linear `score` head read at each row's last non-pad token. With an adapter method the head is
trained whole next to the adapter and saved with it (PEFT task_type SEQ_CLS, modules_to_save).

Run directory of objective.name=reward: adapter/ (PEFT, SEQ_CLS) or model/ (full), tokenizer/,
manifest.json with "objective": {"name": "reward", ...}. `load_reward_model` reads it for
`tunesmith score`, `tunesmith eval` and the RL recipe's reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

Metrics = dict[str, torch.Tensor]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs, + center * mean((r_c + r_r)^2).
    Matches TRL `RewardTrainer.compute_loss` (margin column, center_rewards_coefficient)."""
    raise NotImplementedError


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    label: str

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """One score per conversation (prompt messages + the assistant reply), rendered with the
        reward model's chat template, batched."""
        raise NotImplementedError


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward run directory (objective.name=reward) loaded for scoring; ModelError naming the
    path when it is not one."""
    raise NotImplementedError
