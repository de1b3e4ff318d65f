"""Bad input through the command line: one line naming the culprit, exit status 2, no output left."""

import numpy as np
import pandas as pd
import pytest

from cli_helpers import error_lines, run_cli


def write_csv(path, rows=40, **changes):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "id": np.arange(rows),
        "user": rng.integers(0, 5, rows),
        "item": rng.integers(0, 7, rows),
        "price": rng.random(rows),
        "click": np.arange(rows) % 2,
        "buy": (np.arange(rows) % 4 == 0).astype(int),
    })
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    frame.to_csv(path, index=False)
    return path


def write_config(tmp_path, train, test):
    path = tmp_path / "job.yaml"
    path.write_text(
        "data:\n"
        "  source: files\n"
        f"  train: [{train}]\n"
        f"  test: [{test}]\n"
        "  validation_fraction: 0.25\n"
        "  schema: {sparse: [user, item], dense: [price], labels: [click, buy], row_id: id}\n"
        "model: {embedding_dim: 4, hidden_dims: [8], num_experts: 2, tower_dims: [4]}\n"
        "train: {epochs: 1, neuron_epochs: 0, batch_size: 8, embedding_optimizer: adagrad}\n"
    )
    return path


def run_bad(tmp_path, train_changes=None, test_changes=None):
    train = write_csv(tmp_path / "train.csv", **(train_changes or {}))
    test = write_csv(tmp_path / "test.csv", **(test_changes or {}))
    out = tmp_path / "run"
    result = run_cli(["train", "--config", str(write_config(tmp_path, train, test)), "--out", str(out)], tmp_path / "cache")
    return result, out


@pytest.mark.parametrize(
    "changes, column, row, problem",
    [
        ({"user": (6, "abc")}, "user", 7, "non-integer"),
        ({"item": (3, -2)}, "item", 4, "negative"),
        ({"price": (9, "nan")}, "price", 10, "NaN"),
        ({"price": (11, "inf")}, "price", 12, "infinite"),
        ({"click": (5, 2)}, "click", 6, "label 2"),
    ],
)
def test_bad_training_value(tmp_path, changes, column, row, problem):
    result, out = run_bad(tmp_path, train_changes=changes)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1
    assert "train.csv" in lines[0]
    assert f"row {row}" in lines[0]
    assert f"column {column}" in lines[0]
    assert problem in lines[0]
    assert not out.exists()


def test_bad_test_file_value_removes_output(tmp_path):
    result, out = run_bad(tmp_path, test_changes={"price": (2, "nan")})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1
    assert "test.csv row 3 column price" in lines[0]
    assert not out.exists()


def test_missing_column(tmp_path):
    train = write_csv(tmp_path / "train.csv")
    pd.read_csv(train).drop(columns=["item"]).to_csv(train, index=False)
    test = write_csv(tmp_path / "test.csv")
    out = tmp_path / "run"
    result = run_cli(["train", "--config", str(write_config(tmp_path, train, test)), "--out", str(out)], tmp_path / "cache")
    assert result.returncode == 2
    assert "missing column item" in error_lines(result)[0]
    assert not out.exists()


def test_empty_file(tmp_path):
    train = write_csv(tmp_path / "train.csv")
    test = tmp_path / "test.csv"
    test.write_text("id,user,item,price,click,buy\n")
    out = tmp_path / "run"
    result = run_cli(["train", "--config", str(write_config(tmp_path, train, test)), "--out", str(out)], tmp_path / "cache")
    assert result.returncode == 2
    assert "test.csv: empty file" in error_lines(result)[0]
    assert not out.exists()


def test_unknown_config_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    result = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")], tmp_path / "cache")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1
    assert "train.learning_rate" in lines[0] and str(path) in lines[0]


def test_bad_override_flag(tmp_path):
    result = run_cli(["train", "--config", "configs/synthetic.yaml", "model.num_experts=two"], tmp_path / "cache")
    assert result.returncode == 2
    assert "model.num_experts must be int" in error_lines(result)[0]
