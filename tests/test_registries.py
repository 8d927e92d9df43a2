"""Each registry is the only list of its names: config validation, `tunesmith init` and the CLI's
choices accept exactly the registry's names, and a wrong name's error lists them."""
import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.names import _REGISTRIES, registered_names


def registries() -> dict[str, set[str]]:
    """Each kind's names, read from the registry itself."""
    from tunesmith.data.formats import FORMATS, TREE_FORMATS
    from tunesmith.data.templates import NAMED
    from tunesmith.eval import EVALUATORS
    from tunesmith.eval.answer_end import ANSWER_ENDS
    from tunesmith.eval.metrics import METRICS
    from tunesmith.methods import METHODS, get_method
    from tunesmith.models.attention import IMPLEMENTATIONS
    from tunesmith.recipes import RECIPES
    from tunesmith.training.allocator import LIBRARIES
    from tunesmith.training.distributed.launch import LAUNCHERS
    from tunesmith.training.distributed.strategy import STRATEGIES
    from tunesmith.training.preference import PREFERENCE_LOSSES
    from tunesmith.training.rl import RL_LOSSES
    from tunesmith.training.trackers import TRACKERS

    get_method("lora")  # registers every method
    return {"data format": {"auto", *FORMATS, *TREE_FORMATS}, "chat template": set(NAMED), "method": set(METHODS),
            "objective": set(RECIPES), "preference loss": set(PREFERENCE_LOSSES), "rl loss": set(RL_LOSSES), "eval task kind": set(EVALUATORS),
            "generation metric": set(METRICS), "tracker": set(TRACKERS),
            "allocator": {"auto", "system", *LIBRARIES}, "attention": {"auto", *IMPLEMENTATIONS},
            "strategy": {"auto", *STRATEGIES}, "launcher": set(LAUNCHERS), "answer end": {"auto", *ANSWER_ENDS}}


# kind -> overrides that put NAME where config validates it
SETTERS = {
    "data format": lambda n: [f"data.format={n}"],
    "chat template": lambda n: [f"data.template={n}"],
    "method": lambda n: [f"method.name={n}"],
    "objective": lambda n: [f"objective.name={n}"],
    "preference loss": lambda n: ["objective.name=dpo", f"objective.loss={n}"],
    "rl loss": lambda n: ["objective.name=rl", f"objective.rl_loss={n}"],
    "eval task kind": lambda n: [f"eval.tasks=[{{name: t, kind: {n}, path: x}}]"],
    "generation metric": lambda n: [f"eval.tasks=[{{name: t, kind: generation, path: x, metrics: [{n}]}}]"],
    "tracker": lambda n: [f"train.trackers=[{n}]"],
    "allocator": lambda n: [f"train.allocator={n}"],
    "attention": lambda n: [f"model.attn_implementation={n}"],
    "strategy": lambda n: [f"train.distributed.strategy={n}"],
    "launcher": lambda n: [f"train.distributed.launcher={n}"],
    "answer end": lambda n: [f"eval.tasks=[{{name: t, kind: generation, path: x, answer_end: {n}}}]"],
}


def test_every_registered_kind_is_tested_here():
    assert set(SETTERS) == set(_REGISTRIES) == set(registries())


@pytest.mark.parametrize("kind", sorted(SETTERS))
def test_config_accepts_exactly_the_registry_names(kind):
    names = registries()[kind]
    assert set(registered_names(kind)) == names
    for name in names:
        load_config(None, SETTERS[kind](name))
    with pytest.raises(ConfigError) as e:
        load_config(None, SETTERS[kind]("bogus-name"))
    listed = str(e.value).split("one of:")[1]
    assert {n.strip() for n in listed.split(",")} == names, str(e.value)


def test_init_lists_the_allowed_names(tmp_path):
    out = tmp_path / "c.yaml"
    assert main(["init", str(out)]) == 0
    text = out.read_text()
    for kind in ("data format", "chat template", "method", "objective", "preference loss", "tracker", "allocator",
                 "attention"):
        assert "One of: " + ", ".join(registered_names(kind)) + "." in text, kind


def test_cli_choices_come_from_the_registries(capsys):
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--help"])
    shown = capsys.readouterr().out
    assert "{" + ",".join(registered_names("data format")) + "}" in shown
    assert "{" + ",".join(registered_names("chat template")) + "}" in shown


def test_recipe_for_is_the_registry():
    from tunesmith.recipes import RECIPES, recipe_for
    from tunesmith.recipes.dpo import run_dpo
    from tunesmith.recipes.reward import run_reward
    from tunesmith.recipes.rl import run_rl
    from tunesmith.recipes.sft import run_sft

    assert recipe_for(load_config(None, [])) is run_sft
    assert recipe_for(load_config(None, ["objective.name=dpo"])) is run_dpo
    assert {name: r.run for name, r in RECIPES.items()} == {"sft": run_sft, "dpo": run_dpo, "reward": run_reward,
                                                             "rl": run_rl}


def test_dpo_recipe_never_branches_on_a_loss_name():
    """Loss-specific behaviour comes from the registry entry's attributes (paired, needs_reference...)."""
    import inspect
    import re

    from tunesmith.recipes import dpo
    from tunesmith.training.preference import PREFERENCE_LOSSES
    from tunesmith.training.rl import RL_LOSSES

    source = inspect.getsource(dpo)
    for name in PREFERENCE_LOSSES:
        assert not re.search(rf"""["']{name}["']""", source), name
