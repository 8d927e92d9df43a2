"""Config keys that would do nothing are refused at load, naming the key: per recipe (every field
of the schema is classified, so a new field cannot slip in as a silent no-op), and across keys
(restore_best without checkpoints, patience without an evaluation, ...)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel

from typing import Annotated

from tunesmith.config import Config, RewardSpec, load_config
from tunesmith.errors import ConfigError
from tunesmith.names import allowed_values
from tunesmith.recipes import OTHER_COMMANDS, RECIPES, classify


def leaf_fields(model: type[BaseModel] = Config, prefix: str = ""):
    """(dotted key, field) of every field, sections and lists of sections walked into."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = getattr(ann, "__args__", (None,))[0]
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (
            inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None)
        if sub is not None:
            yield from leaf_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def non_default(field, refused_too=()):
    """A valid value of the field other than its default (and other than the values in refused_too)."""
    default = field.get_default(call_default_factory=True)
    choices = allowed_values(field.annotation, field.metadata)
    if choices:
        pick = next(c for c in choices if c != default and c not in refused_too)
        return [pick] if isinstance(default, list) else pick
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float) or field.annotation in (float, float | None):
        from pydantic import TypeAdapter

        check = TypeAdapter(Annotated[field.annotation, *field.metadata])
        for value in (round((default or 0.0) + 0.1, 3), round((default or 0.0) - 0.1, 3)):
            try:
                return check.validate_python(value)
            except ValueError:
                pass
    if isinstance(default, list) and field.annotation.__args__[0] is RewardSpec:
        return [{"function": "length", "options": {"target": 10}}]
    return "x"


ALL = list(leaf_fields())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_config_field_is_used_or_refused_by_every_recipe(recipe):
    """A field added to config.py without saying whether each recipe honours it fails here."""
    r = RECIPES[recipe]
    unclassified = [key for key, _ in ALL if classify(r, key) is None]
    assert not unclassified, f"recipe {recipe}: classify these in recipes/__init__.py (uses/refuses): {unclassified}"
    # and every declared key exists (a renamed field must not leave a stale entry behind)
    keys = [k for k, _ in ALL]
    for declared in (*r.uses, *r.refuses, *OTHER_COMMANDS):
        assert any(k == declared or k.startswith(declared + ".") for k in keys), declared
    assert len(ALL) > 90  # the walk reached into every section


@pytest.mark.parametrize("recipe,key", [(r, k) for r in sorted(RECIPES) for k in RECIPES[r].refuses])
def test_refused_key_set_away_from_its_default_is_an_error_naming_it(recipe, key):
    field = dict(ALL).get(key) or Config.model_fields["objective"].annotation.model_fields[key.split(".")[1]]
    value = non_default(field, RECIPES[recipe].refuses[key].allowed)
    override = f"{key}={value}" if not isinstance(value, list) else f"{key}=[{value[0]}]"
    if value and isinstance(value, list) and isinstance(value[0], dict):  # a list of sections: YAML flow style
        override = f"{key}=[{{function: length, options: {{target: 10}}}}]"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"objective.name={recipe}", override])
    assert f"{key}=" in str(e.value) and f"objective.name={recipe}" in str(e.value)
    load_config(None, [f"objective.name={recipe}"])  # the default is fine


def test_dpo_accepts_what_it_does_anyway_and_sft_keeps_its_keys():
    load_config(None, ["objective.name=dpo", "train.micro_batch=batch"])
    cfg = load_config(None, ["data.packing=true", "train.micro_batch=example", "train.parallel_examples=2",
                             "data.train_on=all", "train.threads=2", "train.trackers=[tensorboard]"])
    assert cfg.data.packing and cfg.train.parallel_examples == 2


def test_dpo_refuses_objective_options_its_loss_does_not_read():
    from tunesmith.training.preference import get_preference_loss

    obj = load_config(None, ["objective.name=dpo", "objective.loss=orpo", "objective.simpo_gamma=1.0"]).objective
    with pytest.raises(ConfigError, match=r"objective.loss=orpo does not use objective.simpo_gamma"):
        get_preference_loss("orpo").keywords("orpo", obj)
    obj = load_config(None, ["objective.name=dpo", "objective.loss=simpo", "objective.reference=precomputed"]).objective
    with pytest.raises(ConfigError, match=r"objective.reference=precomputed does nothing with objective.loss=simpo"):
        get_preference_loss("simpo").keywords("simpo", obj)
    obj = load_config(None, ["objective.name=dpo", "objective.loss=simpo", "objective.simpo_gamma=1.0",
                             "objective.beta=2.0"]).objective
    assert get_preference_loss("simpo").keywords("simpo", obj) == {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}


def test_every_method_option_is_read_by_some_method_and_refused_by_the_others():
    from tunesmith.config import MethodSection
    from tunesmith.methods import METHODS, get_method

    get_method("lora")
    options = set(MethodSection.model_fields) - {"name"}
    assert options == {o for m in METHODS.values() for o in m.options}  # a new method.* field must be claimed
    load_config(None, ["method.name=qlora", "method.r=8", "method.double_quant=false"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=full", "method.r=8", "method.num_virtual_tokens=4"])
    assert "method.r=8, method.num_virtual_tokens=4 does nothing with method.name=full" in str(e.value)
    with pytest.raises(ConfigError, match=r"method.r=8 does nothing with method.name=prefix \(it reads "
                                          r"method.num_virtual_tokens\)"):
        load_config(None, ["method.name=prefix", "method.r=8"])


# --- cross-field checks: before any work, naming both keys ----------------------------------------

TASKS = "eval.tasks=[{name: ppl, kind: perplexity, path: notes.txt}]"


@pytest.mark.parametrize("overrides,keys", [
    (["train.restore_best=true", "data.validation=v.jsonl"], ["train.restore_best", "train.save_every"]),
    (["train.patience=2"], ["train.patience", "data.validation"]),
    (["train.restore_best=true", "train.save_every=2"], ["train.restore_best", "data.validation"]),
    (["train.patience=2", "data.validation=v.jsonl"], ["train.patience", "train.eval_every"]),
    (["train.eval_every=5"], ["train.eval_every", "data.validation"]),
    (["train.keep_last=4"], ["train.keep_last", "train.save_every"]),
    (["train.parallel_examples=3", "train.batch_size=4"], ["train.parallel_examples", "train.batch_size",
                                                          "train.grad_accum"]),
    (["train.parallel_examples=2", "train.micro_batch=batch"], ["train.parallel_examples", "train.micro_batch"]),
    (["eval.during_training=true"], ["eval.during_training", "eval.tasks"]),
    (["eval.best_metric=ppl/perplexity", TASKS], ["eval.best_metric", "eval.during_training"]),
    (["eval.best_metric=other/perplexity", "eval.during_training=true", TASKS], ["eval.best_metric", "eval.tasks"]),
    (["data.sources=[{path: a.jsonl}]", "data.train=b.jsonl"], ["data.train", "data.sources"]),
])
def test_keys_that_need_another_key_are_refused_naming_both(overrides, keys):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert all(k in str(e.value) for k in keys), str(e.value)


@pytest.mark.parametrize("overrides", [
    ["train.restore_best=true", "train.save_every=2", "data.validation=v.jsonl"],
    ["train.patience=2", "train.eval_every=5", "data.validation=v.jsonl"],
    # a task metric drives early stopping and the best checkpoint without any validation file
    # (evaluations at every checkpoint: eval/during.py)
    ["train.patience=2", "train.restore_best=true", "train.save_every=2", "eval.during_training=true",
     "eval.best_metric=ppl/perplexity", TASKS],
    ["train.parallel_examples=4", "train.batch_size=2", "train.grad_accum=4"],
    ["train.keep_last=4", "train.save_every=2"],
])
def test_consistent_combinations_load(overrides):
    load_config(None, overrides)


def test_parallel_examples_with_batches_chosen_on_a_gpu_is_an_error():
    """train.micro_batch=auto picks padded batches on a GPU, where parallel_examples would do nothing."""
    from tunesmith.recipes.sft import micro_batching

    tcfg = load_config(None, ["train.parallel_examples=2"]).train
    with pytest.raises(ConfigError, match=r"train.parallel_examples=2 needs train.micro_batch=example"):
        micro_batching(tcfg, SimpleNamespace(device=torch.device("cuda")), None)


def test_max_length_above_the_model_context_is_refused_before_reading_data(tiny_model_dir, tmp_path):
    from tunesmith.recipes import recipe_for

    for objective in ("sft", "dpo"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'absent.jsonl'}",
                                 f"run.output_dir={tmp_path}", "data.max_length=1024", f"objective.name={objective}"])
        with pytest.raises(ConfigError) as e:  # not a DataError about the missing file: checked first
            recipe_for(cfg)(cfg)
        assert "data.max_length=1024" in str(e.value) and "512 positions" in str(e.value)
        assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_example_configs_pass_every_check(path):
    load_config(path)
