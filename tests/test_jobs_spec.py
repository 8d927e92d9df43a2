"""A create-job request -> the run's Config (jobs/spec.py): OpenAI's hyperparameters onto config
keys, "auto" keeping tunesmith's defaults, the `tunesmith` extension validated as the CLI
validates, and every key that would reach a server path refused by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import Config
from tunesmith.jobs import spec
from tunesmith.jobs.layout import Layout, checked, new_id

BASE = "smollm2-135m-instruct"
TRAIN, VALID, RUNS = Path("/jobs/files/file-a"), Path("/jobs/files/file-b"), Path("/jobs/jobs/ftjob-x/runs")


def build(rows: int | None = 40, **request):
    payload = {"model": BASE, "training_file": "file-a", **request}
    return spec.build(payload, BASE, "/models/base", TRAIN, request.get("_valid"), RUNS, train_rows=rows)


def supervised(**hp):
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def test_auto_and_absent_hyperparameters_keep_the_defaults():
    defaults = Config()
    for method in (None, supervised(), supervised(n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto")):
        s, cfg = build(**({"method": method} if method else {}))
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (
            defaults.train.epochs, defaults.train.batch_size, defaults.train.lr)
        assert s.hyperparameters == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}


def test_numbers_map_onto_config_keys():
    s, cfg = build(method=supervised(n_epochs=3, batch_size=2, learning_rate_multiplier=0.5), seed=9, suffix="v1")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (3, 2, 9)
    assert cfg.train.lr == pytest.approx(Config().train.lr * 0.5)
    assert s.method == {"type": "supervised", "supervised": {"hyperparameters": s.hyperparameters}}
    assert (cfg.model.name, cfg.data.train, cfg.run.output_dir, cfg.run.name) == (
        "/models/base", str(TRAIN), str(RUNS), "run")


def test_the_older_top_level_hyperparameters_are_supervised_ones():
    _, cfg = build(hyperparameters={"n_epochs": 2})
    assert cfg.train.epochs == 2
    with pytest.raises(spec.SpecError) as err:
        build(hyperparameters={"n_epochs": 2}, method={"type": "dpo"})
    assert err.value.param == "hyperparameters"


def test_dpo_sets_the_objective_and_beta():
    s, cfg = build(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}})
    assert (cfg.objective.name, cfg.objective.beta) == ("dpo", 0.3)
    assert s.hyperparameters["beta"] == 0.3


def test_the_extension_sets_any_config_key_nested_or_dotted():
    s, cfg = build(tunesmith={"method": {"r": 8, "alpha": 16}, "train.warmup_steps": 2, "data.max_length": 256})
    assert (cfg.method.r, cfg.method.alpha, cfg.train.warmup_steps, cfg.data.max_length) == (8, 16, 2, 256)
    assert s.tunesmith == {"method.r": 8, "method.alpha": 16, "train.warmup_steps": 2, "data.max_length": 256}


@pytest.mark.parametrize("extension, param", [
    ({"data": {"train": "/etc/passwd"}}, "tunesmith.data.train"),
    ({"data.validation": "/x"}, "tunesmith.data.validation"),
    ({"data.sources": [{"path": "/x"}]}, "tunesmith.data.sources"),
    ({"run": {"output_dir": "/tmp"}}, "tunesmith.run.output_dir"),
    ({"model.name": "/other/model"}, "tunesmith.model.name"),
    ({"model.trust_remote_code": True}, "tunesmith.model.trust_remote_code"),
    ({"eval": {"tasks": [{"name": "a", "kind": "perplexity", "path": "/etc/hosts"}]}}, "tunesmith.eval.tasks"),
    ({"prepare.output_dir": "/tmp"}, "tunesmith.prepare.output_dir"),
    ({"train.distributed.deepspeed.config": "/x.json"}, "tunesmith.train.distributed.deepspeed.config"),
])
def test_keys_that_reach_server_paths_are_refused_by_name(extension, param):
    with pytest.raises(spec.SpecError) as err:
        build(tunesmith=extension)
    assert err.value.param == param
    assert param.removeprefix("tunesmith.") in str(err.value)


def test_an_unknown_key_is_refused_with_the_cli_s_suggestion():
    with pytest.raises(spec.SpecError, match="did you mean 'train.lr'"):
        build(tunesmith={"train.lrr": 1e-4})


def test_a_key_set_twice_is_refused():
    with pytest.raises(spec.SpecError, match="train.epochs is set twice"):
        build(method=supervised(n_epochs=2), tunesmith={"train": {"epochs": 3}})
    with pytest.raises(spec.SpecError, match="seed"):
        build(seed=1, tunesmith={"train.seed": 2})


@pytest.mark.parametrize("request_, param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"suffix": "a/b"}, "suffix"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"method": supervised(beta=0.1)}, "method.supervised.hyperparameters.beta"),
    ({"method": supervised(n_epochs=0)}, "method.supervised.hyperparameters.n_epochs"),
    ({"method": supervised(n_epochs=-1)}, "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
    ({"integrations": [{"type": "wandb"}]}, "integrations"),
    ({"tunesmith": {"method.name": "full"}}, "tunesmith.method.name"),
    ({"tunesmith": {"objective.name": "sft"}, "method": {"type": "dpo"}}, "tunesmith.objective.name"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_requests_name_their_field(request_, param):
    with pytest.raises(spec.SpecError) as err:
        build(**request_)
    assert err.value.param == param


def test_checkpoints_are_saved_about_ten_times_unless_asked_otherwise():
    _, cfg = build(rows=40, method=supervised(n_epochs=2, batch_size=4))  # 20 steps
    assert cfg.train.save_every == 2
    _, cfg = build(rows=40, tunesmith={"train.save_every": 7})
    assert cfg.train.save_every == 7
    _, cfg = build(rows=3)
    assert cfg.train.save_every == 1


def test_fine_tuned_model_names_follow_openai():
    assert spec.fine_tuned_model_name("smollm2", "orders", "ftjob-abc") == "ft:smollm2:orders:abc"
    assert spec.fine_tuned_model_name("org/model", None, "ftjob-abc") == "ft:org--model::abc"


def test_ids_are_checked_before_any_path_is_made(tmp_path):
    lay = Layout.create(tmp_path / "jobs")
    good = new_id("ftjob")
    assert lay.job_dir(good).parent == lay.root / "jobs"
    for bad in ("../../etc", "ftjob-../../x", "file-" + "0" * 24, "ftjob-" + "G" * 24, "", None):
        with pytest.raises(ValueError):
            lay.job_dir(bad)
    assert checked(new_id("file"), "file").startswith("file-")
