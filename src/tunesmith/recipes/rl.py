"""Online RL recipe (objective.name=rl): setup -> (rollout -> score -> optimise) per step -> save."""
from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config


def run_rl(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    raise NotImplementedError
