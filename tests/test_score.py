"""Batch scoring: parts and ranks, scores against the model, kill and rerun, input errors."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from mome_rec.cli import main
from mome_rec.data.batches import make_batch
from mome_rec.data.preprocess import Arrays
from mome_rec.errors import DataError, InputError
from mome_rec.export import export_model
from mome_rec.scoring import MANIFEST_FILE, SUCCESS_FILE, plan_parts, rank_parts, score_files
from test_export import REPO, pruned_mome

ROWS = {"a.parquet": 300, "b.parquet": 100, "c.csv": 50}


@pytest.fixture(scope="module")
def trained():
    return pruned_mome()


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.mome"
    export_model(trained, path)
    return path


def input_table(first_id: int, rows: int, seed: int) -> pa.Table:
    """Rows of the tiny schema (ids a, b, c; dense x, y; row id ``id``), with ids unseen in training too."""
    generator = np.random.default_rng(seed)
    return pa.table({
        "id": np.arange(first_id, first_id + rows, dtype=np.int64),
        "a": generator.integers(1, 5, rows),
        "b": generator.choice([5, 7, 9], rows),
        "c": generator.integers(0, 13, rows),
        "x": generator.standard_normal(rows),
        "y": generator.standard_normal(rows),
    })


def write_inputs(folder: Path, row_group_rows: int = 64) -> Path:
    """Write a.parquet (300 rows in groups of ``row_group_rows``), b.parquet (100 rows) and c.csv (50 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(input_table(0, ROWS["a.parquet"], 1), folder / "a.parquet", row_group_size=row_group_rows)
    pq.write_table(input_table(300, ROWS["b.parquet"], 2), folder / "b.parquet")
    pa_csv.write_csv(input_table(400, ROWS["c.csv"], 3), folder / "c.csv")
    return folder


def read_parts(out_dir: Path) -> dict:
    return {path.name: pq.read_table(path) for path in sorted(out_dir.glob("part-*.parquet"))}


def expected_scores(trained, inputs: Path) -> dict:
    """Return row id -> probabilities from the trained model itself."""
    scores = {}
    for path in sorted(inputs.iterdir()):
        table = pq.read_table(path) if path.suffix == ".parquet" else pa_csv.read_csv(path)
        arrays = trained.preprocessor.transform(table.combine_chunks().to_batches()[0], path, 0, with_labels=False)
        batch = make_batch(Arrays(arrays.sparse, arrays.dense), list(trained.preprocessor.schema.sparse))
        with torch.no_grad():
            probabilities = torch.sigmoid(trained.model(batch.dense_features, batch.sparse_features)).numpy()
        for row_id, row in zip(table.column("id").to_pylist(), probabilities):
            scores[row_id] = row
    return scores


def test_parts_and_rank_split(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    files = sorted(inputs.iterdir())
    parts = plan_parts(files)
    # a.parquet: 300 rows in groups of 64 -> 5 parts (4 x 64 + 44); b.parquet: 1 part; c.csv: 1 part.
    assert [part.name for part in parts] == [
        "part-00000-00000.parquet", "part-00000-00001.parquet", "part-00000-00002.parquet",
        "part-00000-00003.parquet", "part-00000-00004.parquet", "part-00001-00000.parquet", "part-00002-00000.parquet",
    ]
    assert [part.rows for part in parts] == [64, 64, 64, 64, 44, 100, None]
    assert [part.name for part in rank_parts(parts, 1, 3)] == ["part-00000-00001.parquet", "part-00000-00004.parquet"]
    with pytest.raises(InputError):
        rank_parts(parts, 2, 2)


def test_scores_match_trained_model(trained, model_file, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    summary = score_files(model_file, [inputs], tmp_path / "out", progress=False)
    assert (summary.rows, summary.parts_written, summary.parts_skipped) == (450, 7, 0)

    table = pa.concat_tables(read_parts(tmp_path / "out").values())
    assert table.column_names == ["id", "click_score", "buy_score"]
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(450))
    expected = expected_scores(trained, inputs)
    scores = np.stack([table.column("click_score").to_numpy(), table.column("buy_score").to_numpy()], axis=1)
    reference = np.stack([expected[row_id] for row_id in ids])
    assert np.abs(scores - reference).max() < 1e-6
    assert (tmp_path / "out" / SUCCESS_FILE).read_text() == "7 parts\n"
    assert not list((tmp_path / "out").glob(".*"))


def torchrun_score(model_file: Path, inputs: Path, out_dir: Path, ranks: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", "--local_addr", "127.0.0.1",
        "-m", "mome_rec", "score", "--model", str(model_file), "--input", str(inputs), "--out", str(out_dir),
        "--threads", "1", "--no-progress",
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_one_and_two_ranks_write_identical_parts(model_file, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun workers run one thread each
    try:
        score_files(model_file, [inputs], tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    result = torchrun_score(model_file, inputs, tmp_path / "two", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2: scored" in result.stderr
    assert "rank 1 of 2: scored" in result.stderr

    one, two = read_parts(tmp_path / "one"), read_parts(tmp_path / "two")
    assert list(one) == list(two)
    for name in one:
        assert one[name].equals(two[name]), name


def test_rerun_after_kill_gives_same_rows(model_file, tmp_path):
    inputs = write_inputs(tmp_path / "in", row_group_rows=4)  # 75 + 1 + 1 parts
    score_files(model_file, [inputs], tmp_path / "reference", progress=False)
    reference = read_parts(tmp_path / "reference")

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mome_rec", "score", "--model", str(model_file), "--input", str(inputs),
               "--out", str(out), "--batch-rows", "2", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()

    finished = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")}
    assert finished, "the killed run finished no part before the kill"
    if len(finished) == len(reference):
        # The run ended before the kill: take one part away so that the rerun has work to do.
        name = sorted(finished)[-1]
        (out / name).unlink()
        del finished[name]
    missing = sorted(set(reference) - set(finished))
    (out / f".{missing[0]}.tmp-999999").write_bytes(b"half a part")  # what a kill leaves mid-part

    summary = score_files(model_file, [inputs], out, progress=False)
    assert summary.parts_skipped == len(finished)
    assert summary.parts_written == len(reference) - len(finished)
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not list(out.glob(".part-*"))

    rerun = read_parts(out)
    assert list(rerun) == list(reference)
    for name in reference:
        assert rerun[name].equals(reference[name]), name
    ids = pa.concat_tables(rerun.values()).column("id").to_pylist()
    assert sorted(ids) == list(range(450))


def test_missing_column_is_the_training_error(model_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "a.parquet"
    pq.write_table(input_table(0, 20, 1).drop(["y"]), path)
    with pytest.raises(DataError) as error:
        score_files(model_file, [folder], tmp_path / "out", progress=False)
    assert str(error.value) == f"{path}: missing column y"


def test_bad_value_names_row_and_column(model_file, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    table = input_table(0, 20, 1)
    x = table.column("x").to_numpy().copy()
    x[7] = np.nan
    path = folder / "a.parquet"
    pq.write_table(table.set_column(table.column_names.index("x"), "x", pa.array(x)), path)

    caplog.set_level(logging.INFO)
    code = main(["score", "--model", str(model_file), "--input", str(folder), "--out", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors == [f"{path} row 8 column x: NaN value"]
    assert not list((tmp_path / "out").glob("part-*"))
    assert not list((tmp_path / "out").glob(".part-*"))


def test_rerun_with_other_inputs_is_rejected(model_file, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    score_files(model_file, [inputs / "b.parquet"], tmp_path / "out", progress=False)
    with pytest.raises(InputError) as error:
        score_files(model_file, [inputs], tmp_path / "out", progress=False)
    assert MANIFEST_FILE in str(error.value)


def test_rank_from_environment_must_be_in_range(model_file, tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path / "in")
    monkeypatch.setitem(os.environ, "RANK", "2")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    assert main(["score", "--model", str(model_file), "--input", str(inputs), "--out", str(tmp_path / "out")]) == 2
