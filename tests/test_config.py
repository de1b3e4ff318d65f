from pathlib import Path

import pytest

from mome_rec.config import expand_columns, load_config
from mome_rec.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_expand_columns_ranges():
    assert expand_columns(["a_{1..3}", "b"]) == ["a_1", "a_2", "a_3", "b"]


def test_synthetic_config_loads():
    config = load_config(str(CONFIGS / "synthetic.yaml"))
    assert config.data.source == "synthetic"
    assert len(config.data.schema.sparse) == 16
    assert len(config.data.schema.dense) == 63
    assert config.data.schema.labels == ["click", "conversion"]


def test_paper_config_keeps_paper_settings():
    config = load_config(str(CONFIGS / "aliexpress_nl.yaml")) if Path("/data/AliExpress_NL/train.parquet").exists() else None
    if config is None:
        with pytest.raises(ConfigError, match="data.train path /data/AliExpress_NL/train.parquet not found"):
            load_config(str(CONFIGS / "aliexpress_nl.yaml"))


def test_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n")
    config = load_config(str(path), ["train.epochs=2", "model.hidden_dims=[64, 32]", "train.lr=1e-2"])
    assert config.train.epochs == 2
    assert config.model.hidden_dims == [64, 32]
    assert config.train.lr == pytest.approx(0.01)


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  epochz: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert "train.epochz" in str(info.value)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "model:\n  num_experts: many\n")
    with pytest.raises(ConfigError, match="model.num_experts must be int"):
        load_config(str(path))


def test_bool_is_not_int(tmp_path):
    path = write(tmp_path, "train:\n  epochs: true\n")
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        load_config(str(path))


def test_missing_data_file_names_path(tmp_path):
    path = write(tmp_path, "data:\n  source: files\n  train: [nowhere.csv]\n  test: [nowhere.csv]\n  schema:\n    labels: [click]\n")
    with pytest.raises(ConfigError, match="data.train path .*nowhere.csv not found"):
        load_config(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_neuron_epochs_bounded(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n  neuron_epochs: 3\n")
    with pytest.raises(ConfigError, match="train.neuron_epochs"):
        load_config(str(path))


def test_bad_override_syntax(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(str(path), ["train.epochs"])


def test_mask_lr_default_and_bounds(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.002\n")
    assert load_config(str(path)).train.mask_lr is None
    assert load_config(str(path), ["train.mask_lr=0.05"]).train.mask_lr == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="train.mask_lr must be positive, got -0.1"):
        load_config(str(path), ["train.mask_lr=-0.1"])


def test_override_error_names_override(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["train.epochs=abc"])
    assert str(info.value) == "override 'train.epochs=abc': train.epochs must be int, got 'abc'"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["model.nonexistent=3"])
    assert str(info.value).startswith("override 'model.nonexistent=3': unknown key model.nonexistent")
