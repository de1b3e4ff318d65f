"""BatchStream and make_batch: KJT layout, rank partition, holdout, shuffle and resume."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mome_rec.config import SchemaConfig
from mome_rec.data.batches import BatchStream, make_batch
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.data.synthetic import aliexpress_schema


def make_files(tmp_path):
    """Two parquet files (several row groups) and one CSV; column ``id`` numbers the rows 0..N-1."""
    sizes = [("a.parquet", 57), ("b.csv", 23), ("c.parquet", 41)]
    paths, start = [], 0
    for name, rows in sizes:
        ids = np.arange(start, start + rows)
        table = pa.table({"id": ids, "f": ids % 7, "g": ids % 3, "x": ids * 0.5, "label": ids % 2})
        path = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(table, path, row_group_size=10)
        else:
            table.to_pandas().to_csv(path, index=False)
        paths.append(path)
        start += rows
    return paths, start


def schema() -> SchemaConfig:
    return SchemaConfig(sparse=["f", "g"], dense=["x"], labels=["label"], row_id="id")


@pytest.fixture
def files(tmp_path):
    paths, total = make_files(tmp_path)
    return paths, total, Preprocessor.fit(paths, schema())


def stream_ids(stream: BatchStream) -> list:
    return [int(value) for arrays in stream.iter_arrays() for value in arrays.row_ids]


def test_make_batch_layout():
    arrays = Arrays(
        sparse=np.array([[1, 2], [3, 4], [5, 6]]),
        dense=np.array([[0.5], [1.5], [2.5]], dtype=np.float32),
        labels=np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32),
    )
    batch = make_batch(arrays, ["f", "g"])
    kjt = batch.sparse_features
    assert kjt.keys() == ["f", "g"]
    assert kjt.values().tolist() == [1, 3, 5, 2, 4, 6]
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1]
    assert kjt["g"].values().tolist() == [2, 4, 6]
    assert batch.dense_features.dtype == torch.float32
    assert batch.dense_features.tolist() == [[0.5], [1.5], [2.5]]
    assert batch.labels.shape == (3, 2)
    assert batch.labels.tolist() == [[1, 0], [0, 1], [1, 1]]


def test_make_batch_without_dense_or_labels():
    arrays = Arrays(sparse=np.array([[7], [8]]), dense=np.zeros((2, 0), dtype=np.float32))
    batch = make_batch(arrays, ["f"])
    assert batch.dense_features.shape == (2, 0)
    assert batch.labels.shape == (2, 0)
    assert batch.sparse_features.values().tolist() == [7, 8]


def test_ordered_stream_covers_rows_in_order(files):
    paths, total, preprocessor = files
    stream = BatchStream(paths, preprocessor, batch_size=8, split="eval", read_rows=6, with_row_ids=True)
    assert stream_ids(stream) == list(range(total))
    assert stream.num_rows() == total
    assert len(stream) == -(-total // 8)
    batches = list(stream)
    assert len(batches) == len(stream)
    assert batches[-1].labels.shape == (total % 8, 1)


def test_train_drops_last_partial_batch(files):
    paths, total, preprocessor = files
    stream = BatchStream(paths, preprocessor, batch_size=8, with_row_ids=True)
    assert len(stream) == total // 8
    assert sum(len(arrays) for arrays in stream.iter_arrays()) == total // 8 * 8


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_partition_disjoint_and_complete(files, world_size, shuffle):
    paths, total, preprocessor = files
    seen = []
    for rank in range(world_size):
        stream = BatchStream(
            paths, preprocessor, 4, split="eval", shuffle=shuffle, rank=rank, world_size=world_size,
            read_rows=7, shuffle_buffer_rows=16, with_row_ids=True,
        )
        ids = stream_ids(stream)
        # Row ids equal global positions here, so each rank must get exactly g % world_size == rank.
        assert all(value % world_size == rank for value in ids)
        assert len(ids) == stream.num_rows()
        assert len(ids) == len(set(ids))
        seen.extend(ids)
    assert sorted(seen) == list(range(total))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_holdout_split_disjoint_and_complete(files, world_size):
    paths, total, preprocessor = files
    train_ids, eval_ids = [], []
    for rank in range(world_size):
        common = dict(rank=rank, world_size=world_size, holdout=4, drop_last=False, with_row_ids=True)
        train = BatchStream(paths, preprocessor, 5, split="train", **common)
        held_out = BatchStream(paths, preprocessor, 5, split="eval", **common)
        train_ids += stream_ids(train)
        eval_ids += stream_ids(held_out)
        assert len(stream_ids(train)) == train.num_rows()
        assert len(stream_ids(held_out)) == held_out.num_rows()
        for arrays in held_out.iter_arrays():
            assert (arrays.row_index % 4 == 0).all()
    assert not set(train_ids) & set(eval_ids)
    assert sorted(train_ids + eval_ids) == list(range(total))
    # Rows 0, 4, 8, ... of each file (sizes 57, 23, 41) are held out: 15 + 6 + 11.
    assert len(eval_ids) == 32


@pytest.mark.parametrize("split", ["train", "eval"])
def test_holdout_split_balanced_over_ranks(files, split):
    # holdout 4 and world size 2 share a factor; ranks must still differ by at most one row.
    paths, _, preprocessor = files
    counts = []
    for rank in range(2):
        stream = BatchStream(
            paths, preprocessor, 5, split=split, rank=rank, world_size=2, holdout=4, drop_last=False, with_row_ids=True
        )
        counts.append(len(stream_ids(stream)))
        assert counts[-1] == stream.num_rows()
    expected_total = 32 if split == "eval" else 121 - 32
    assert sum(counts) == expected_total
    assert abs(counts[0] - counts[1]) <= 1


def test_shuffle_reproducible_and_changes_per_epoch(files):
    paths, total, preprocessor = files

    def order(epoch: int) -> list:
        stream = BatchStream(paths, preprocessor, 4, shuffle=True, seed=5, read_rows=9,
                             shuffle_buffer_rows=20, drop_last=False, with_row_ids=True)
        stream.set_epoch(epoch)
        return stream_ids(stream)

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert first != list(range(total))
    assert sorted(first) == list(range(total))
    assert sorted(order(1)) == list(range(total))


def test_shuffle_depends_on_seed(files):
    paths, _, preprocessor = files
    orders = []
    for seed in (0, 1):
        stream = BatchStream(paths, preprocessor, 4, shuffle=True, seed=seed, with_row_ids=True)
        orders.append(stream_ids(stream))
    assert orders[0] != orders[1]


@pytest.mark.parametrize("shuffle", [False, True])
def test_skip_batches_resumes_tail(files, shuffle):
    paths, _, preprocessor = files
    stream = BatchStream(paths, preprocessor, 6, shuffle=shuffle, seed=3, read_rows=5,
                         shuffle_buffer_rows=24, with_row_ids=True)
    stream.set_epoch(2)
    full = [arrays.row_ids.tolist() for arrays in stream.iter_arrays()]
    tail = [arrays.row_ids.tolist() for arrays in stream.iter_arrays(skip_batches=4)]
    assert len(full) == len(stream)
    assert tail == full[4:]

    window = [arrays.row_ids.tolist() for arrays in stream.iter_arrays(skip_batches=2, max_batches=3)]
    assert window == full[2:5]

    batches = list(stream.iterate(skip_batches=4))
    assert [batch.labels.shape[0] for batch in batches] == [len(ids) for ids in tail]
    assert list(stream.iterate(max_batches=0)) == []


def test_batch_values_match_preprocessor(files):
    paths, _, preprocessor = files
    stream = BatchStream(paths[:1], preprocessor, 10, split="eval", with_row_ids=True)
    arrays = next(stream.iter_arrays())
    batch = next(iter(stream))
    # Vocabulary of f is 0..6 and of g is 0..2, so indices equal the raw ids.
    assert arrays.row_ids.tolist() == list(range(10))
    assert batch.sparse_features["f"].values().tolist() == [i % 7 for i in range(10)]
    assert batch.sparse_features["g"].values().tolist() == [i % 3 for i in range(10)]
    assert batch.labels[:, 0].tolist() == [i % 2 for i in range(10)]


def test_empty_path_list():
    preprocessor = Preprocessor(schema(), {"f": [1], "g": [2]}, {"x": 0.0}, {"x": 1.0})
    stream = BatchStream([], preprocessor, 4, split="eval")
    assert stream.num_rows() == 0
    assert len(stream) == 0
    assert list(stream) == []


def test_aliexpress_sample_streams(shared_data):
    sample = shared_data / "aliexpress_sample"
    train, test = sample / "train.csv", sample / "test.csv"
    preprocessor = Preprocessor.fit([train], aliexpress_schema())
    assert preprocessor.num_embeddings("categorical_7") > 2

    stream = BatchStream([train], preprocessor, 32, shuffle=True)
    assert stream.num_rows() == 100
    batches = list(stream)
    assert len(batches) == 3
    assert batches[0].dense_features.shape == (32, 63)
    assert batches[0].sparse_features.keys() == aliexpress_schema().sparse
    assert batches[0].labels.shape == (32, 2)

    scored = BatchStream([test], preprocessor, 8, split="eval", with_labels=False, with_row_ids=True)
    arrays = list(scored.iter_arrays())
    assert sum(len(part) for part in arrays) == 20
    assert arrays[0].labels is None
    assert arrays[0].row_ids[:2].tolist() == [30, 34]
