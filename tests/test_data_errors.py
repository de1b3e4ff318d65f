"""Bad input files raise one-line DataErrors naming the file, the column and the first bad row."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mome_rec.config import SchemaConfig
from mome_rec.data.batches import BatchStream
from mome_rec.data.convert import convert_csv_to_parquet
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.reader import count_rows, iter_record_batches
from mome_rec.errors import DataError, InputError

HEADER = "a,b,x,click"
GOOD_ROW = "1,2,0.5,0"


def schema() -> SchemaConfig:
    return SchemaConfig(sparse=["a", "b"], dense=["x"], labels=["click"])


def csv_with(tmp_path, bad_row: str, bad_at: int, rows: int = 6):
    """Write a CSV of ``rows`` data rows where data row ``bad_at`` (1-based) is ``bad_row``."""
    lines = [HEADER] + [bad_row if row == bad_at else GOOD_ROW for row in range(1, rows + 1)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


CSV_CASES = [
    # (bad row, 1-based row, column, words in the message)
    ("1.5,2,0.5,0", 3, "a", "non-integer"),
    ("1,x7,0.5,0", 4, "b", "non-integer"),
    ("-3,2,0.5,0", 2, "a", "negative id -3"),
    (",2,0.5,0", 5, "a", "missing id"),
    ("1,2,nan,0", 3, "x", "NaN"),
    ("1,2,inf,0", 6, "x", "infinite"),
    ("1,2,-inf,0", 1, "x", "infinite"),
    ("1,2,abc,0", 2, "x", "non-numeric"),
    ("1,2,,0", 4, "x", "missing value"),
    ("1,2,0.5,2", 3, "click", "label 2 is not 0 or 1"),
    ("1,2,0.5,0.5", 3, "click", "label 0.5 is not 0 or 1"),
    ("1,2,0.5,", 2, "click", "missing label"),
]


@pytest.mark.parametrize("bad_row, bad_at, column, words", CSV_CASES)
def test_csv_errors_in_fit(tmp_path, bad_row, bad_at, column, words):
    path = csv_with(tmp_path, bad_row, bad_at)
    with pytest.raises(DataError) as raised:
        Preprocessor.fit([path], schema())
    message = str(raised.value)
    assert message.startswith(f"{path} row {bad_at} column {column}: ")
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize("bad_row, bad_at, column, words", CSV_CASES)
def test_csv_errors_in_stream(tmp_path, bad_row, bad_at, column, words):
    good = tmp_path / "good.csv"
    good.write_text(f"{HEADER}\n{GOOD_ROW}\n3,4,1.5,1\n")
    preprocessor = Preprocessor.fit([good], schema())
    path = csv_with(tmp_path, bad_row, bad_at)
    stream = BatchStream([path], preprocessor, batch_size=2, split="eval")
    with pytest.raises(DataError) as raised:
        list(stream)
    assert str(raised.value).startswith(f"{path} row {bad_at} column {column}: ")
    assert words in str(raised.value)


def test_first_bad_row_wins_across_columns(tmp_path):
    path = tmp_path / "data.csv"
    rows = [GOOD_ROW, GOOD_ROW, "1,2,nan,0", GOOD_ROW, "-1,2,0.5,0"]
    path.write_text("\n".join([HEADER] + rows) + "\n")
    with pytest.raises(DataError, match=r"row 3 column x: NaN"):
        Preprocessor.fit([path], schema())


def test_bad_row_in_later_csv_block(tmp_path):
    # 30,000 rows span several CSV read blocks; the parse error must still name the right row.
    path = csv_with(tmp_path, "7,2.25,0.5,0", 25_000, rows=30_000)
    with pytest.raises(DataError, match=rf"^{path} row 25000 column b: non-integer value '2.25'$"):
        Preprocessor.fit([path], schema(), read_rows=1000)


def test_bad_row_in_later_read_batch(tmp_path):
    path = csv_with(tmp_path, "1,2,0.5,3", 9, rows=12)
    with pytest.raises(DataError, match=rf"^{path} row 9 column click: label 3 is not 0 or 1$"):
        Preprocessor.fit([path], schema(), read_rows=4)


def test_malformed_csv_row(tmp_path):
    path = csv_with(tmp_path, "1,2,0.5", 4)
    with pytest.raises(DataError, match=rf"^{path} row 4: expected 4 fields like the header, got 3$"):
        Preprocessor.fit([path], schema())


def test_missing_column_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,x,click\n1,0.5,0\n")
    with pytest.raises(DataError, match=rf"^{path}: missing column b$"):
        Preprocessor.fit([path], schema())


def test_missing_column_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"a": [1], "b": [2], "x": [0.5]}), path)
    with pytest.raises(DataError, match=rf"^{path}: missing column click$"):
        Preprocessor.fit([path], schema())


@pytest.mark.parametrize("text", ["", "a,b,x,click\n"])
def test_empty_csv(tmp_path, text):
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}: empty file \(no rows\)$"):
        Preprocessor.fit([path], schema())


def test_empty_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    empty = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64()),
                      "x": pa.array([], pa.float64()), "click": pa.array([], pa.int64())})
    pq.write_table(empty, path)
    with pytest.raises(DataError, match=rf"^{path}: empty file \(no rows\)$"):
        Preprocessor.fit([path], schema())


@pytest.mark.parametrize("name", ["data.csv", "data.parquet"])
def test_empty_file_in_stream(tmp_path, name):
    good = tmp_path / "good.csv"
    good.write_text(f"{HEADER}\n{GOOD_ROW}\n")
    preprocessor = Preprocessor.fit([good], schema())
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text(HEADER + "\n")
    else:
        pq.write_table(pa.table({"a": pa.array([], pa.int64())}), path)
    stream = BatchStream([good, path], preprocessor, batch_size=2, split="eval")
    with pytest.raises(DataError, match=rf"^{path}: empty file \(no rows\)$"):
        len(stream)


def test_unsupported_and_missing_files(tmp_path):
    text = tmp_path / "data.txt"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_record_batches(text, ["a"], 10))
    with pytest.raises(DataError, match=r"nowhere\.parquet: file not found"):
        count_rows(tmp_path / "nowhere.parquet")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        count_rows(broken)


PARQUET_CASES = [
    # (column, values, 1-based bad row, words)
    ("a", [1, 2, -4, 5], 3, "negative id -4"),
    ("a", [1.0, 2.5, 3.0, 4.0], 2, "non-integer id 2.5"),
    ("a", ["1", "2", "3", "x"], 4, "non-integer id 'x'"),
    ("a", [1, None, 3, 4], 2, "missing id"),
    ("x", [0.1, 0.2, 0.3, float("nan")], 4, "NaN"),
    ("x", [float("inf"), 0.2, 0.3, 0.4], 1, "infinite"),
    ("click", [0, 1, 2, 0], 3, "label 2 is not 0 or 1"),
    ("click", [0, 1, None, 0], 3, "missing label"),
]


@pytest.mark.parametrize("column, values, bad_at, words", PARQUET_CASES)
def test_parquet_errors(tmp_path, column, values, bad_at, words):
    data = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "x": [0.1, 0.2, 0.3, 0.4], "click": [0, 1, 0, 1]}
    data[column] = values
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table(data), path, row_group_size=2)
    with pytest.raises(DataError) as raised:
        Preprocessor.fit([path], schema(), read_rows=1)
    assert str(raised.value).startswith(f"{path} row {bad_at} column {column}: ")
    assert words in str(raised.value)


def test_held_out_bad_row_reported_by_validation_stream(tmp_path):
    # Row 1 (0-based 0) is held out with holdout=2: fit skips it, the validation stream reports it.
    path = csv_with(tmp_path, "1,2,0.5,7", 1)
    preprocessor = Preprocessor.fit([path], schema(), holdout=2)
    validation = BatchStream([path], preprocessor, 4, split="eval", holdout=2)
    with pytest.raises(DataError, match=r"row 1 column click: label 7"):
        list(validation)


def test_convert_reports_bad_row(tmp_path):
    path = csv_with(tmp_path, "1,2,0.5", 5)
    with pytest.raises(DataError, match=r"row 5: expected 4 fields"):
        convert_csv_to_parquet(path, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_data_error_is_input_error():
    assert issubclass(DataError, InputError)
