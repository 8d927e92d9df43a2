"""Recipes, one per objective, chosen by `objective.name`."""
from __future__ import annotations


def recipe_for(cfg):
    if cfg.objective.name == "dpo":
        from tunesmith.recipes.dpo import run_dpo

        return run_dpo
    from tunesmith.recipes import sft

    return sft.run_sft
