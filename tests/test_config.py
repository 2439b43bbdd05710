import pytest

from mmcl.config import Config, ConfigError

from mmcl.config_loader import load_config, parse_overrides
from tests.conftest import DEBUG_CONFIG


def test_defaults_and_overrides():
    config = load_config(DEBUG_CONFIG, ["--train.max_steps=3", "--train.learning_rate", "2e-3",
                                        "--model.text_config.hidden_size=48", "--data.validation=null", "--data.validation_share=0"])
    assert config.train.max_steps == 3
    assert config.train.learning_rate == 2e-3
    assert config.model.text_config["hidden_size"] == 48
    assert config.model.text_config["num_hidden_layers"] == 2  # the rest of the dict is kept
    assert config.data.validation is None


def test_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError, match=r"train\.max_step.*did you mean 'max_steps'"):
        load_config(DEBUG_CONFIG, ["--train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        load_config(DEBUG_CONFIG, ["--trian.max_steps=3"])


@pytest.mark.parametrize("override, message", [
    ("--train.max_steps=ten", "'train.max_steps' must be int"),
    ("--train.max_steps=true", "'train.max_steps' must be int"),
    ("--train.mixed_precision=fp8", "choose one of auto, no, bf16, fp16"),
    ("--eval.retrieval_ks=[1, x]", r"'eval.retrieval_ks\[1\]' must be int"),
])
def test_wrong_type_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG_CONFIG, [override])


def test_best_metric_must_name_an_evaluation():
    with pytest.raises(ConfigError, match="eval.best_metric 'vall/top1' names no evaluation.*one of val"):
        load_config(DEBUG_CONFIG, ["--eval.best_metric=vall/top1"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  output_dri: x\n")
    with pytest.raises(ConfigError, match="did you mean 'output_dir'"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(bad)


def test_override_syntax():
    assert parse_overrides(["--a.b=1", "--a.c", "2"]) == {"a": {"b": "1", "c": "2"}}
    with pytest.raises(ConfigError, match="needs a section"):
        parse_overrides(["--max_steps=1"])


def test_every_shipped_config_loads():
    from tests.conftest import REPO

    for path in (REPO / "configs").glob("*.yaml"):
        assert isinstance(load_config(path), Config), path
        assert path.read_text().startswith("#"), f"{path} must start with a comment header"
