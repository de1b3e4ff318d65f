"""Streaming reads of CSV and parquet files in record batches of bounded size.

Rows are numbered from 0 within each file. Errors raise
:class:`~mome_rec.errors.DataError` whose message names the file and, where
there is one, the 1-based data row (the header is not counted) and the column.

Example::

    for first_row, batch in iter_record_batches(path, ["click", "categorical_1"], read_rows=65536):
        ...  # batch.num_rows <= 65536, and its rows are first_row, first_row + 1, ...
"""

import csv
import functools
import gzip
import io
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from mome_rec.errors import DataError, first_line

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")

_SAMPLE_BYTES = 1 << 20
_MIN_BLOCK_BYTES = 1 << 16
_MAX_BLOCK_BYTES = 1 << 28


def file_format(path) -> str:
    """Return ``"csv"`` or ``"parquet"`` from the file name, or raise DataError for any other file."""
    name = Path(path).name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    raise DataError(f"{path}: unsupported file type (expected .csv, .csv.gz, .parquet or .pq)")


def iter_record_batches(
    path,
    columns: Sequence[str],
    read_rows: int,
    *,
    column_types: Optional[Dict[str, pa.DataType]] = None,
    row_groups: Optional[List[int]] = None,
) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """Yield ``(first_row, batch)``: record batches of at most ``read_rows`` rows with ``columns`` in that order.

    Args:
        path: a ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq`` file.
        columns: the columns to read. A name missing from the file raises
            ``DataError("PATH: missing column NAME")``.
        read_rows: the maximum rows per batch.
        column_types: CSV only, the type to parse a column as (others are
            inferred from the first block). A value that does not parse raises
            DataError naming its row and column. Parquet columns keep their
            stored types.
        row_groups: parquet only, read just these row groups (in this order).

    A file without data rows raises ``DataError("PATH: empty file (no rows)")``.
    """
    if read_rows <= 0:
        raise ValueError(f"read_rows must be positive, got {read_rows}")
    columns = list(dict.fromkeys(columns))
    if file_format(path) == "parquet":
        return _iter_parquet(Path(path), columns, read_rows, row_groups)
    if row_groups is not None:
        raise ValueError(f"{path}: row_groups applies to parquet files only")
    return _iter_csv(Path(path), columns, read_rows, dict(column_types or {}))


def count_rows(path) -> int:
    """Return the number of data rows: from the metadata of parquet, by one streaming pass over CSV.

    CSV counts are cached per path, size and modification time.
    """
    path = Path(path)
    stat = _stat(path)
    if file_format(path) == "parquet":
        return _open_parquet(path).metadata.num_rows
    return _count_csv_rows(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def parquet_row_groups(path) -> List[Tuple[int, int]]:
    """Return ``(first_row, num_rows)`` of each row group of a parquet file."""
    metadata = _open_parquet(Path(path)).metadata
    groups = []
    first = 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        groups.append((first, rows))
        first += rows
    return groups


def first_invalid_index(array: pa.Array, target_type: pa.DataType) -> Optional[int]:
    """Return the index of the first value of ``array`` that does not cast to ``target_type``, or None.

    Casting is vectorised, and a failing cast is bisected, so locating the
    value costs about two casts of the array.
    """
    if can_cast(array, target_type):
        return None
    low, high = 0, len(array)  # the first failure is in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if can_cast(array.slice(low, middle - low), target_type):
            low = middle
        else:
            high = middle
    return low


def describe_invalid(value, target_type: pa.DataType) -> str:
    """Describe a value that failed to parse as ``target_type``, e.g. ``non-integer value '3.5'``."""
    if pa.types.is_integer(target_type):
        return f"non-integer value {value!r}"
    if pa.types.is_floating(target_type):
        return f"non-numeric value {value!r}"
    return f"invalid value {value!r} for type {target_type}"


# ------------------------------------------------------------------ parquet


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def _open_parquet(path: Path) -> pq.ParquetFile:
    _stat(path)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({first_line(error)})") from error


def _iter_parquet(
    path: Path, columns: List[str], read_rows: int, row_groups: Optional[List[int]]
) -> Iterator[Tuple[int, pa.RecordBatch]]:
    parquet = _open_parquet(path)
    names = set(parquet.schema_arrow.names)
    for name in columns:
        if name not in names:
            raise DataError(f"{path}: missing column {name}")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")

    metadata = parquet.metadata
    starts = [0]
    for index in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(index).num_rows)
    groups = range(metadata.num_row_groups) if row_groups is None else row_groups
    for group in groups:
        first = starts[group]
        for batch in parquet.iter_batches(batch_size=read_rows, row_groups=[group], columns=columns):
            yield first, batch.select(columns)
            first += batch.num_rows


# ---------------------------------------------------------------------- CSV


def _read_sample(path: Path) -> bytes:
    _stat(path)
    with pa.input_stream(str(path), compression="detect") as stream:
        return stream.read(_SAMPLE_BYTES)


def csv_header(path) -> List[str]:
    """Return the column names of a CSV file's header (an empty list for an empty file)."""
    sample = _read_sample(Path(path)).decode("utf-8", errors="replace")
    return next(csv.reader(io.StringIO(sample)), [])


def _block_bytes(sample: bytes, read_rows: int) -> int:
    """Estimate the block size in bytes that holds about ``read_rows`` rows."""
    lines = max(sample.count(b"\n"), 1)
    per_row = max(len(sample) // lines, 1)
    return int(min(max(per_row * read_rows * 1.1, _MIN_BLOCK_BYTES), _MAX_BLOCK_BYTES))


def open_csv_stream(path: Path, columns: List[str], column_types: Dict[str, pa.DataType], block_bytes: int):
    """Open a streaming CSV reader of ``columns``.

    Only empty fields read as null, so ``nan`` stays a NaN float and ``NA`` a string.
    """
    return pa_csv.open_csv(
        str(path),
        read_options=pa_csv.ReadOptions(block_size=block_bytes),
        convert_options=pa_csv.ConvertOptions(
            include_columns=columns,
            column_types=column_types,
            null_values=[""],
            strings_can_be_null=True,
        ),
    )


def _iter_csv(
    path: Path, columns: List[str], read_rows: int, column_types: Dict[str, pa.DataType]
) -> Iterator[Tuple[int, pa.RecordBatch]]:
    sample = _read_sample(path)
    header = next(csv.reader(io.StringIO(sample.decode("utf-8", errors="replace"))), None)
    if header is None:
        raise DataError(f"{path}: empty file (no rows)")
    present = set(header)
    for name in columns:
        if name not in present:
            raise DataError(f"{path}: missing column {name}")

    types = {name: kind for name, kind in column_types.items() if name in columns}
    block_bytes = _block_bytes(sample, read_rows)
    first = 0
    try:
        reader = open_csv_stream(path, columns, types, block_bytes)
        for batch in reader:
            for offset in range(0, batch.num_rows, read_rows):
                part = batch.slice(offset, read_rows)
                yield first, part.select(columns)
                first += part.num_rows
    except pa.ArrowInvalid as error:
        raise locate_csv_error(path, columns, types, block_bytes, error) from error
    if first == 0:
        raise DataError(f"{path}: empty file (no rows)")


def locate_csv_error(
    path: Path, columns: List[str], types: Dict[str, pa.DataType], block_bytes: int, error: pa.ArrowInvalid
) -> DataError:
    """Turn an arrow CSV error into a DataError that names the first bad row and column."""
    message = first_line(error)
    if "parse error" in message.lower():
        return _locate_malformed_row(path, message)

    # A value failed to convert: read the typed columns as text and find the first one that fails.
    as_text = {name: pa.string() for name in types}
    first = 0
    try:
        for batch in open_csv_stream(path, columns, as_text, block_bytes):
            found = []
            for name in types:
                index = first_invalid_index(batch.column(name), types[name])
                if index is not None:
                    found.append((index, columns.index(name), name))
            if found:
                index, _, name = min(found)
                value = batch.column(name)[index].as_py()
                problem = describe_invalid(value, types[name])
                return DataError(f"{path} row {first + index + 1} column {name}: {problem}")
            first += batch.num_rows
    except pa.ArrowInvalid:
        pass
    return DataError(f"{path}: invalid CSV ({message})")


def _locate_malformed_row(path: Path, message: str) -> DataError:
    """Find the first record whose field count differs from the header's (a slow pass, for errors only)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as text:
        records = csv.reader(text)
        header = next(records, [])
        for row, record in enumerate(records, start=1):
            if record and len(record) != len(header):
                return DataError(
                    f"{path} row {row}: expected {len(header)} fields like the header, got {len(record)}"
                )
    return DataError(f"{path}: invalid CSV ({message})")


@functools.lru_cache(maxsize=256)
def _count_csv_rows(path: str, size: int, mtime_ns: int) -> int:
    header = csv_header(path)
    if not header:
        return 0
    rows = 0
    try:
        for batch in open_csv_stream(Path(path), header[:1], {header[0]: pa.string()}, 1 << 24):
            rows += batch.num_rows
    except pa.ArrowInvalid as error:
        raise _locate_malformed_row(Path(path), first_line(error)) from error
    return rows


def can_cast(array: pa.Array, target_type: pa.DataType) -> bool:
    """Return whether every value of ``array`` casts (safely) to ``target_type``."""
    try:
        pc.cast(array, target_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True
