"""Preprocessor: vocabularies, out-of-vocabulary ids, dense standardisation and serialisation."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mome_rec.config import SchemaConfig
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.data.reader import iter_record_batches

TRAIN_CSV = """id,a,b,x,y,click,buy
10,5,7,1.0,2.0,0,1
11,3,7,3.0,2.0,1,0
12,5,9,5.0,2.0,0,0
13,8,7,7.0,2.0,1,1
"""

EVAL_CSV = """id,a,b,x,y,click,buy
20,8,9,4.0,3.0,1,0
21,99,7,6.0,2.0,0,1
"""


def int_schema() -> SchemaConfig:
    return SchemaConfig(sparse=["a", "b"], dense=["x", "y"], labels=["click", "buy"], row_id="id")


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def transform_file(preprocessor: Preprocessor, path, with_labels: bool = True) -> Arrays:
    parts = []
    columns = preprocessor.columns(with_labels, with_row_id=True)
    for first_row, batch in iter_record_batches(path, columns, 65536, column_types=preprocessor.csv_types(with_labels)):
        parts.append(preprocessor.transform(batch, path, first_row, with_labels))
    return Arrays.concat(parts)


def test_vocabulary_and_out_of_vocabulary(tmp_path):
    preprocessor = Preprocessor.fit([write(tmp_path, "train.csv", TRAIN_CSV)], int_schema())
    assert preprocessor.vocabularies["a"].tolist() == [3, 5, 8]
    assert preprocessor.vocabularies["b"].tolist() == [7, 9]
    assert preprocessor.num_embeddings("a") == 4
    assert preprocessor.table_sizes() == {"a": 4, "b": 3}

    arrays = transform_file(preprocessor, write(tmp_path, "eval.csv", EVAL_CSV))
    # a: 8 -> index 2, 99 unseen -> out-of-vocabulary index 3; b: 9 -> 1, 7 -> 0.
    assert arrays.sparse.dtype == np.int64
    assert arrays.sparse.tolist() == [[2, 1], [3, 0]]
    assert arrays.labels.dtype == np.float32
    assert arrays.labels.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert arrays.row_ids.tolist() == [20, 21]
    assert arrays.row_index.tolist() == [0, 1]


def test_dense_standardisation(tmp_path):
    preprocessor = Preprocessor.fit([write(tmp_path, "train.csv", TRAIN_CSV)], int_schema())
    # x = 1, 3, 5, 7: mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5. y is constant: std 0 -> 1.
    assert preprocessor.mean == {"x": 4.0, "y": 2.0}
    assert preprocessor.std["x"] == pytest.approx(math.sqrt(5.0))
    assert preprocessor.std["y"] == 1.0

    arrays = transform_file(preprocessor, write(tmp_path, "eval.csv", EVAL_CSV))
    assert arrays.dense.dtype == np.float32
    np.testing.assert_allclose(arrays.dense, [[0.0, 1.0], [2.0 / math.sqrt(5.0), 0.0]], rtol=1e-6)


def test_fit_skips_held_out_rows(tmp_path):
    # holdout 2 holds out file rows 0 and 2, so the training rows have a = 3, 8 and x = 3, 7.
    preprocessor = Preprocessor.fit([write(tmp_path, "train.csv", TRAIN_CSV)], int_schema(), holdout=2)
    assert preprocessor.vocabularies["a"].tolist() == [3, 8]
    assert preprocessor.vocabularies["b"].tolist() == [7]
    assert preprocessor.mean["x"] == 5.0
    assert preprocessor.std["x"] == 2.0


def test_streaming_statistics_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 30.0, 5000)
    table = pa.table({"a": rng.integers(0, 50, 5000), "x": x, "y": rng.random(5000), "click": rng.integers(0, 2, 5000)})
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=700)
    schema = SchemaConfig(sparse=["a"], dense=["x", "y"], labels=["click"])

    preprocessor = Preprocessor.fit([path], schema, read_rows=333)
    assert preprocessor.mean["x"] == pytest.approx(x.mean(), rel=1e-12)
    assert preprocessor.std["x"] == pytest.approx(x.std(), rel=1e-9)
    assert preprocessor.vocabularies["a"].tolist() == sorted(set(table.column("a").to_pylist()))


def test_string_ids_unseen_and_null(tmp_path):
    train = write(tmp_path, "train.csv", "color,x,label\nred,1,0\nblue,2,1\n,3,0\nred,4,1\n")
    schema = SchemaConfig(sparse=["color"], dense=["x"], labels=["label"], sparse_kind="string")
    preprocessor = Preprocessor.fit([train], schema)
    assert preprocessor.vocabularies["color"].to_pylist() == ["blue", "red"]
    assert preprocessor.num_embeddings("color") == 3

    scored = write(tmp_path, "score.csv", "color,x\nred,1\ngreen,1\n,1\nblue,1\n")
    arrays = transform_file(preprocessor, scored, with_labels=False)
    assert arrays.sparse[:, 0].tolist() == [1, 2, 2, 0]
    assert arrays.labels is None


def test_integral_float_ids_accepted_from_parquet(tmp_path):
    path = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"a": [3.0, 1.0, 3.0], "x": [0.0, 1.0, 2.0], "click": [0, 1, 0]}), path)
    preprocessor = Preprocessor.fit([path], SchemaConfig(sparse=["a"], dense=["x"], labels=["click"]))
    assert preprocessor.vocabularies["a"].tolist() == [1, 3]


def test_round_trip_through_json(tmp_path):
    preprocessor = Preprocessor.fit([write(tmp_path, "train.csv", TRAIN_CSV)], int_schema())
    state = preprocessor.to_dict()
    restored = Preprocessor.from_dict(json.loads(json.dumps(state)))
    assert restored.to_dict() == state
    assert restored.schema == preprocessor.schema

    path = write(tmp_path, "eval.csv", EVAL_CSV)
    original, again = transform_file(preprocessor, path), transform_file(restored, path)
    assert np.array_equal(original.sparse, again.sparse)
    assert np.array_equal(original.dense, again.dense)


def test_string_round_trip_through_json(tmp_path):
    train = write(tmp_path, "train.csv", "color,x,label\nred,1,0\nblue,2,1\n")
    schema = SchemaConfig(sparse=["color"], dense=["x"], labels=["label"], sparse_kind="string")
    state = Preprocessor.fit([train], schema).to_dict()
    assert Preprocessor.from_dict(json.loads(json.dumps(state))).to_dict() == state


def test_transform_rows_override_error_row(tmp_path):
    preprocessor = Preprocessor.fit([write(tmp_path, "train.csv", TRAIN_CSV)], int_schema())
    batch = pa.record_batch(
        {"a": [5, -1], "b": [7, 7], "x": [1.0, 1.0], "y": [2.0, 2.0], "click": [0, 1], "buy": [0, 0]}
    )
    # The batch's rows are file rows 10 and 40 (0-based): the bad one is data row 41.
    with pytest.raises(Exception, match=r"f\.csv row 41 column a: negative id -1"):
        preprocessor.transform(batch, "f.csv", 0, rows=np.array([10, 40]))
