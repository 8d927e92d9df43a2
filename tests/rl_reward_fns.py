"""Reward functions the RL tests name by import path (objective.rewards=[{function: 'rl_reward_fns:...'}])."""


def low_ids(prompts, completions, completion_ids=None, **columns):
    """The share of a completion's tokens with an id below 200: learnable by a tiny random model."""
    return [sum(t < 200 for t in ids) / max(len(ids), 1) for ids in completion_ids]
