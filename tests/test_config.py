"""The run config schema: one pydantic model for UI, REST, CLI and worker."""

import pytest
import yaml

from engine.config import ConfigError, RunConfig, load_run_config, parse_run_config

BASE = {"name": "demo", "model": "tiny-bert", "task": "classification", "dataset": {"name": "demo-sentiment"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "training": {"max_steps": 5, "batch_size": 4, "learning_rate": 1e-3}}


def with_(path: str, value):
    import copy
    d = copy.deepcopy(BASE)
    cur = d
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return d


def test_valid_config_round_trips_through_yaml():
    cfg = parse_run_config(BASE)
    again = parse_run_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.method.r == 8 and again.method.target_modules == ["query", "value"]


@pytest.mark.parametrize("path,value,field", [
    ("method.r", 0, "method.r"),
    ("method.r", -3, "method.r"),
    ("training.learning_rate", 0, "training.learning_rate"),
    ("training.learning_rate", -1e-4, "training.learning_rate"),
    ("training.batch_size", 0, "training.batch_size"),
    ("task", "regression", "task"),
    ("method.name", "nonsense", "method.name"),
    ("dataset", {}, "dataset"),
])
def test_impossible_values_name_the_field(path, value, field):
    with pytest.raises(ConfigError) as e:
        parse_run_config(with_(path, value))
    assert field in str(e.value)


@pytest.mark.parametrize("where", ["", "training.", "method.", "dataset."])
def test_unknown_keys_are_rejected_with_their_name(where):
    d = with_(where + "learning_rat" if where else "learning_rat", 1)
    with pytest.raises(ConfigError) as e:
        parse_run_config(d)
    assert "learning_rat" in str(e.value) and "unknown key" in str(e.value)


def test_config_file_errors(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_run_config(p)


def test_json_schema_is_exported():
    schema = RunConfig.model_json_schema()
    assert {"model", "dataset", "method", "training"} <= set(schema["properties"])
