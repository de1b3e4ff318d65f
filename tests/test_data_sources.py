"""Split resolution (synthetic, census, files), the prepared-data cache and CSV to parquet conversion."""

import multiprocessing
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mome_rec.config import DataConfig, SchemaConfig, SyntheticConfig
from mome_rec.data import convert
from mome_rec.data.convert import convert_csv_to_parquet
from mome_rec.data.sources import cache_root, census_schema, expand_paths, resolve_splits
from mome_rec.data.synthetic import aliexpress_schema, generate_synthetic_table
from mome_rec.errors import ConfigError, DataError


def small_synthetic(tmp_path, **overrides) -> DataConfig:
    values = dict(train_rows=300, validation_rows=100, test_rows=50, seed=1)
    values.update(overrides)
    return DataConfig(source="synthetic", cache_dir=str(tmp_path / "cache"), synthetic=SyntheticConfig(**values))


def test_synthetic_splits_cached(tmp_path):
    data = small_synthetic(tmp_path)
    splits = resolve_splits(data)
    folder = splits.train[0].parent
    assert folder.parent == tmp_path / "cache"
    assert folder.name.startswith("synthetic-")
    assert splits.validation == [folder / "validation.parquet"]
    assert splits.test == [folder / "test.parquet"]
    assert splits.holdout is None
    assert splits.schema == aliexpress_schema()
    assert pq.ParquetFile(splits.validation[0]).metadata.num_rows == 100
    assert pq.read_table(splits.test[0]).equals(generate_synthetic_table(50, seed=1, start=400))

    written = splits.train[0].stat().st_mtime_ns
    again = resolve_splits(data)
    assert again.train == splits.train
    assert again.train[0].stat().st_mtime_ns == written

    other = resolve_splits(small_synthetic(tmp_path, seed=2))
    assert other.train[0].parent != folder


def test_synthetic_without_validation_uses_holdout(tmp_path):
    data = small_synthetic(tmp_path, validation_rows=0)
    data.validation_fraction = 0.2
    splits = resolve_splits(data)
    assert splits.validation == []
    assert splits.holdout == 5


def test_synthetic_keeps_configured_schema(tmp_path):
    data = small_synthetic(tmp_path)
    data.schema = SchemaConfig(sparse=["categorical_1"], dense=[], labels=["click"])
    assert resolve_splits(data).schema.sparse == ["categorical_1"]


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MOME_REC_CACHE", str(tmp_path / "from-env"))
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "explicit"))) == tmp_path / "explicit"
    assert cache_root(DataConfig()) == tmp_path / "from-env"
    monkeypatch.delenv("MOME_REC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "mome_rec"


def resolve_in_child(cache_dir: str, queue) -> None:
    data = DataConfig(source="synthetic", cache_dir=cache_dir, synthetic=SyntheticConfig(20_000, 1000, 1000, seed=4))
    queue.put(str(resolve_splits(data).train[0]))


def test_concurrent_preparation(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=resolve_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    results = {queue.get(timeout=5) for _ in workers}
    assert len(results) == 1

    entries = sorted(name for name in os.listdir(tmp_path) if not name.endswith(".lock"))
    assert len(entries) == 1
    assert entries[0].startswith("synthetic-")
    assert pq.ParquetFile(results.pop()).metadata.num_rows == 20_000


def test_census_splits(tmp_path, shared_data):
    source = shared_data / "adult" / "adult.parquet"
    data = DataConfig(
        source="census", path=str(source), cache_dir=str(tmp_path), schema=SchemaConfig(labels=["income"])
    )
    splits = resolve_splits(data)
    assert splits.schema == census_schema()
    assert splits.holdout is None

    tables = {name: pq.read_table(getattr(splits, name)[0]) for name in ("train", "validation", "test")}
    assert tables["test"].num_rows == 9_769
    assert tables["validation"].num_rows == 9_769
    assert tables["train"].num_rows == 29_304
    for table in tables.values():
        assert "marital-status" not in table.column_names
        assert table.schema.field("income").type == pa.int64()
        assert table.schema.field("workclass").type == pa.string()
        assert table.schema.field("age").type == pa.float64()
        assert abs(np.mean(table.column("income").to_numpy()) - 0.239) < 0.01
        assert abs(np.mean(table.column("never_married").to_numpy()) - 0.330) < 0.01

    # Rows keep their positions: source rows 0, 1 and 2 open test, validation and train.
    original = pq.read_table(source).to_pandas()
    for split, position in (("test", 0), ("validation", 1), ("train", 2)):
        assert tables[split].column("fnlwgt")[0].as_py() == float(original["fnlwgt"][position])
        assert tables[split].column("income")[0].as_py() == int(original["income"][position].startswith(">50K"))
        married = original["marital-status"][position] == "Never-married"
        assert tables[split].column("never_married")[0].as_py() == int(married)


def test_files_source(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("b.parquet", "a.csv", ".hidden.csv", "notes.txt"):
        (folder / name).write_text("x")
    single = tmp_path / "test.csv"
    single.write_text("x")
    schema = SchemaConfig(sparse=["f"], dense=[], labels=["y"])
    data = DataConfig(source="files", schema=schema, train=[str(folder)], test=[str(single)], validation_fraction=0.25)

    splits = resolve_splits(data)
    assert splits.train == [folder / "a.csv", folder / "b.parquet"]
    assert splits.validation == []
    assert splits.test == [single]
    assert splits.holdout == 4
    assert splits.schema is schema

    data.validation = [str(single)]
    assert resolve_splits(data).holdout is None


def test_files_source_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder contains no .csv or .parquet files"):
        expand_paths([empty])
    with pytest.raises(DataError, match="missing.csv: file or folder not found"):
        expand_paths([tmp_path / "missing.csv"])
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        expand_paths([tmp_path / "data.json"])

    (tmp_path / "t.csv").write_text("x")
    data = DataConfig(source="files", schema=SchemaConfig(sparse=["f"], labels=["y"]), train=[str(tmp_path / "t.csv")])
    data.validation_fraction = 0.9
    with pytest.raises(ConfigError, match="validation_fraction"):
        resolve_splits(data)
    data.validation_fraction = 0.1
    data.schema = SchemaConfig(dense=["x"], labels=["y"])
    with pytest.raises(ConfigError, match="data.schema.sparse"):
        resolve_splits(data)


def test_convert_round_trip(tmp_path, shared_data):
    source = shared_data / "aliexpress_sample" / "train.csv"
    target = tmp_path / "train.parquet"
    assert convert_csv_to_parquet(source, target, row_group_rows=32) == 100

    parquet = pq.ParquetFile(target)
    assert parquet.metadata.num_row_groups == 4
    assert parquet.schema_arrow.field("search_id").type == pa.int64()
    assert parquet.schema_arrow.field("categorical_1").type == pa.int64()
    assert parquet.schema_arrow.field("numerical_1").type == pa.float32()
    assert parquet.schema_arrow.field("click").type == pa.int64()

    expected = pd.read_csv(source)
    converted = parquet.read().to_pandas()
    assert list(converted.columns) == list(expected.columns)
    for column in expected.columns:
        np.testing.assert_allclose(
            converted[column].to_numpy(np.float64), expected[column].to_numpy(np.float64), rtol=1e-6
        )
    assert [name for name in os.listdir(tmp_path)] == ["train.parquet"]


def test_convert_types_over_whole_file(tmp_path, monkeypatch):
    # A small block size makes the float and the text appear only in a later block.
    monkeypatch.setattr(convert, "_BLOCK_BYTES", 1 << 16)
    rows = 20_000
    frame = pd.DataFrame({"id": np.arange(rows), "value": np.zeros(rows, dtype=np.int64).astype(object),
                          "name": np.arange(rows).astype(object)})
    frame.loc[rows - 1, "value"] = 0.25
    frame.loc[rows - 1, "name"] = "last"
    source = tmp_path / "mixed.csv"
    frame.to_csv(source, index=False)

    assert convert_csv_to_parquet(source, tmp_path / "mixed.parquet") == rows
    table = pq.read_table(tmp_path / "mixed.parquet")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("value").type == pa.float32()
    assert table.schema.field("name").type == pa.string()
    assert table.column("value")[rows - 1].as_py() == 0.25
    assert table.column("name")[rows - 1].as_py() == "last"
