"""ftrain.config: a dataclass from a YAML file and command-line overrides; unknown keys are named."""

import dataclasses

import pytest

import ftrain


@dataclasses.dataclass
class Config:
    """A run."""

    epochs: int = 40
    """training epochs"""
    batch_size: int = 64
    lr: float = 3e-3
    no_compile: bool = False


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_defaults_and_flags_override_them(tmp_path):
    path = write(tmp_path, "epochs: 3\nlr: 0.01\n")
    config = ftrain.config.parse(Config, ["--config", path, "--batch-size", "32", "--no-compile"])
    assert config == Config(epochs=3, batch_size=32, lr=0.01, no_compile=True)
    assert ftrain.config.parse(Config, []) == Config()
    assert ftrain.config.to_dict(config) == {"epochs": 3, "batch_size": 32, "lr": 0.01, "no_compile": True}


def test_a_key_that_is_not_a_field_is_named(tmp_path):
    path = write(tmp_path, "epochs: 3\nlearning_rate: 0.01\n")
    with pytest.raises(ValueError, match=r"\['learning_rate'\] is not a field of Config; its fields are \['epochs'"):
        ftrain.config.parse(Config, ["--config", path])
    with pytest.raises(TypeError, match="must be a dataclass type"):
        ftrain.config.load_yaml(dict, path)
