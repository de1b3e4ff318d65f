"""Streaming CSV to parquet conversion, for faster reads and row-group shuffling.

Example::

    rows = convert_csv_to_parquet(Path("train.csv"), Path("train.parquet"))
"""

import logging
import os
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from mome_rec.data.reader import can_cast, csv_header, file_format, locate_csv_error, open_csv_stream
from mome_rec.errors import DataError

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 1 << 24


def convert_csv_to_parquet(src: Path, dst: Path, row_group_rows: int = 65536) -> int:
    """Convert a CSV file to parquet in two streaming passes and return the rows written.

    The first pass finds each column's type over the whole file: int64 when
    every value is an integer, float32 when every value is a number, else
    string (a column of only empty values is string). The second pass writes
    row groups of ``row_group_rows`` rows to a temporary name in ``dst``'s
    folder, then renames it to ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if file_format(src) != "csv":
        raise DataError(f"{src}: expected a .csv or .csv.gz file")
    if row_group_rows <= 0:
        raise ValueError(f"row_group_rows must be positive, got {row_group_rows}")
    header = csv_header(src)
    if not header:
        raise DataError(f"{src}: empty file (no rows)")

    types = _infer_types(src, header)
    temporary = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    rows = 0
    writer = None
    try:
        for batch in open_csv_stream(src, header, types, _BLOCK_BYTES):
            table = pa.Table.from_batches([batch])
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table, row_group_size=row_group_rows)
            rows += batch.num_rows
        if writer is None or rows == 0:
            raise DataError(f"{src}: empty file (no rows)")
        writer.close()
        writer = None
        os.replace(temporary, dst)
    except pa.ArrowInvalid as error:
        raise locate_csv_error(src, header, types, _BLOCK_BYTES, error) from error
    finally:
        if writer is not None:
            writer.close()
        if temporary.exists():
            temporary.unlink()
    logger.info("converted %s to %s (%d rows)", src, dst, rows)
    return rows


def _infer_types(src: Path, header: List[str]) -> Dict[str, pa.DataType]:
    """Return, per column, the narrowest of int64, float32 and string that parses every value."""
    candidates = {name: [pa.int64(), pa.float32(), pa.string()] for name in header}
    seen_value = {name: False for name in header}
    as_text = {name: pa.string() for name in header}
    try:
        for batch in open_csv_stream(src, header, as_text, _BLOCK_BYTES):
            for name in header:
                column = batch.column(name)
                if column.null_count == len(column):
                    continue
                seen_value[name] = True
                while len(candidates[name]) > 1 and not can_cast(column, candidates[name][0]):
                    candidates[name].pop(0)
    except pa.ArrowInvalid as error:
        raise locate_csv_error(src, header, {}, _BLOCK_BYTES, error) from error
    return {name: candidates[name][0] if seen_value[name] else pa.string() for name in header}

