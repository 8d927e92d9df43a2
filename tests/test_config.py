import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import Config, commented_template, load_config
from tunesmith.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_misspelt_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lerning_rate: 1\n  bach_size: 2\n"))
    msg = str(e.value)
    assert "unknown key 'train.bach_size'" in msg and "did you mean 'train.batch_size'" in msg
    # no close match: lists the valid keys of that section instead of guessing
    assert "train.lerning_rate" in msg


def test_misspelt_section_and_override_key(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'method'"):
        load_config(write(tmp_path, "methd:\n  r: 4\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'method.alpha'"):
        load_config(None, ["method.alpah=8"])


def test_wrong_type_names_field_and_expected_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  batch_size: eight\n"))
    assert "field 'train.batch_size': expected an integer, got 'eight'" in str(e.value)
    with pytest.raises(ConfigError, match=r"method.name"):
        load_config(None, ["method.name=lorax"])


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr=1e-4", "method.r=8",
                                                               "data.validation=v.jsonl", "run.name=x"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.method.r == 8 and cfg.data.validation == "v.jsonl" and cfg.run.name == "x"
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="tunesmith init"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_init_template_is_commented_and_loads_to_defaults(tmp_path):
    out = tmp_path / "starter.yaml"
    assert main(["init", str(out)]) == 0
    text = out.read_text()
    for field in Config.model_fields["train"].annotation.model_fields.values():
        assert f"# {field.description}" in text
    assert load_config(out) == Config()
    assert main(["init", str(out)]) == 2  # refuses to overwrite without --force
    assert commented_template() == text


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    cfg = write(tmp_path, "trian:\n  lr: 1\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train'" in err and "Traceback" not in err


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(None, ["train.lr=3e-4", "method.target_modules=[q_proj,v_proj]"])
    from tunesmith.config import dump_config, parse_config

    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
