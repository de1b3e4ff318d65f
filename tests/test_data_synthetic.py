"""Synthetic AliExpress-shaped data: layout, determinism, label rates and learnable signal."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mome_rec.config import SyntheticConfig
from mome_rec.data.synthetic import (
    BLOCK_ROWS,
    CARDINALITIES,
    aliexpress_schema,
    generate_synthetic_table,
    label_logits,
    write_synthetic,
)
from mome_rec.errors import ConfigError


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC; scores here are continuous, so ties are negligible."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def test_auc_helper_matches_hand_count():
    # Pairs (positive, negative): (0.8, 0.1) (0.8, 0.5) (0.4, 0.1) (0.4, 0.5) -> 3 of 4 ordered.
    assert auc(np.array([1, 0, 1, 0]), np.array([0.8, 0.1, 0.4, 0.5])) == pytest.approx(0.75)


def test_schema_matches_aliexpress_layout():
    schema = aliexpress_schema()
    assert schema.sparse == [f"categorical_{i}" for i in range(1, 17)]
    assert schema.dense == [f"numerical_{i}" for i in range(1, 64)]
    assert schema.labels == ["click", "conversion"]
    assert schema.row_id == "search_id"
    assert len(CARDINALITIES) == 16


def test_table_columns_and_types():
    table = generate_synthetic_table(rows=500, seed=0)
    schema = aliexpress_schema()
    assert table.column_names == ["search_id"] + schema.sparse + schema.dense + schema.labels
    assert str(table.schema.field("search_id").type) == "int64"
    assert str(table.schema.field("categorical_1").type) == "int64"
    assert str(table.schema.field("numerical_1").type) == "float"
    assert str(table.schema.field("click").type) == "int64"
    assert table.column("search_id").to_pylist() == list(range(500))

    for field, cardinality in enumerate(CARDINALITIES):
        values = table.column(f"categorical_{field + 1}").to_numpy()
        assert values.min() >= 0
        assert values.max() < cardinality

    dense = np.stack([table.column(name).to_numpy() for name in schema.dense], axis=1)
    assert dense.min() >= 0.0
    assert dense.max() <= 1.0
    assert 0.2 < (dense == 0).mean() < 0.6


def test_rows_depend_only_on_seed_and_index():
    whole = generate_synthetic_table(rows=1000, seed=7, start=BLOCK_ROWS - 400).to_pandas()
    first = generate_synthetic_table(rows=500, seed=7, start=BLOCK_ROWS - 400).to_pandas()
    second = generate_synthetic_table(rows=500, seed=7, start=BLOCK_ROWS + 100).to_pandas()
    assert whole.iloc[:500].reset_index(drop=True).equals(first)
    assert whole.iloc[500:].reset_index(drop=True).equals(second)

    again = generate_synthetic_table(rows=1000, seed=7, start=BLOCK_ROWS - 400).to_pandas()
    assert whole.equals(again)
    other_seed = generate_synthetic_table(rows=1000, seed=8, start=BLOCK_ROWS - 400).to_pandas()
    assert not whole.equals(other_seed)


def test_label_rates():
    table = generate_synthetic_table(rows=100_000, seed=0)
    click = table.column("click").to_numpy()
    conversion = table.column("conversion").to_numpy()
    assert 0.04 <= click.mean() <= 0.06
    assert conversion[click == 0].sum() == 0
    assert 0.10 <= conversion[click == 1].mean() <= 0.20


def test_negative_seed_rejected():
    with pytest.raises(ConfigError, match="data.synthetic.seed"):
        generate_synthetic_table(rows=10, seed=-1)


def one_hot_features(table) -> np.ndarray:
    schema = aliexpress_schema()
    parts = []
    for field, cardinality in enumerate(CARDINALITIES):
        ids = table.column(schema.sparse[field]).to_numpy()
        parts.append(np.eye(cardinality, dtype=np.float32)[ids])
    parts.append(np.stack([table.column(name).to_numpy() for name in schema.dense], axis=1))
    return np.concatenate(parts, axis=1)


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels.astype(np.float32))
    weight = torch.zeros(features.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ weight[:-1] + weight[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1e-4 * (weight[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def test_click_signal_is_learnable_but_not_linear():
    train = generate_synthetic_table(rows=40_000, seed=0)
    test = generate_synthetic_table(rows=40_000, seed=0, start=40_000)
    click = test.column("click").to_numpy()

    weight = fit_logistic_regression(one_hot_features(train), train.column("click").to_numpy())
    linear_scores = (torch.from_numpy(one_hot_features(test)) @ weight[:-1] + weight[-1]).numpy()
    linear_auc = auc(click, linear_scores)
    true_click_logit, _ = label_logits(test, seed=0)
    best_auc = auc(click, true_click_logit)

    assert linear_auc > 0.65
    assert best_auc > linear_auc + 0.04


def test_write_synthetic_splits(tmp_path):
    cfg = SyntheticConfig(train_rows=BLOCK_ROWS + 100, validation_rows=300, test_rows=200, seed=3)
    paths = write_synthetic(tmp_path, cfg)
    assert sorted(paths) == ["test", "train", "validation"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]

    train = pq.ParquetFile(paths["train"])
    assert train.metadata.num_rows == BLOCK_ROWS + 100
    assert [train.metadata.row_group(i).num_rows for i in range(train.metadata.num_row_groups)] == [BLOCK_ROWS, 100]

    validation = pq.read_table(paths["validation"])
    expected = generate_synthetic_table(rows=300, seed=3, start=BLOCK_ROWS + 100)
    assert validation.equals(expected)
    test = pq.read_table(paths["test"])
    assert test.column("search_id").to_pylist() == list(range(BLOCK_ROWS + 400, BLOCK_ROWS + 600))


def test_write_synthetic_skips_empty_split(tmp_path):
    paths = write_synthetic(tmp_path, SyntheticConfig(train_rows=100, validation_rows=0, test_rows=50))
    assert sorted(paths) == ["test", "train"]
    assert not (tmp_path / "validation.parquet").exists()
