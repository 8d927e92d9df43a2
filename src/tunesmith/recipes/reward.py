"""Reward model recipe (objective.name=reward): setup -> train -> save, top to bottom.

A sequence-scoring head on the base (training/reward_model.py) trained on prompt/chosen/rejected
pairs with the Bradley-Terry loss; held-out pair accuracy logged; saved so that `tunesmith score`,
`tunesmith eval` and the RL recipe (objective.reward_model) load it.
"""
from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config


def run_reward(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    raise NotImplementedError
