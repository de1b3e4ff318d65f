"""Input pipeline rows/s: CSV to parquet conversion, preprocessor fit, and parquet (or CSV) to TorchRec batches.

``batches`` is what the trainer's input costs per epoch: a shuffled
:class:`~mome_rec.data.batches.BatchStream` over the file, every row read,
validated, mapped to vocabulary indices and standardised, and every batch
built as a KeyedJaggedTensor. The preprocessor fit is a separate pass made
once per job.
"""

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List

from benchmarks.common import Dimensions, summary, synthetic_csv, synthetic_parquet, time_interleaved
from mome_rec.data.batches import BatchStream
from mome_rec.data.convert import convert_csv_to_parquet
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.synthetic import aliexpress_schema

logger = logging.getLogger(__name__)


def read_all_batches(path: Path, preprocessor: Preprocessor, batch_size: int, shuffle: bool = True) -> int:
    """Build every batch of one epoch over ``path`` and return the rows they hold."""
    stream = BatchStream([path], preprocessor, batch_size, shuffle=shuffle, drop_last=False)
    rows = 0
    for batch in stream.iterate():
        rows += batch.labels.shape[0]
    return rows


def run_pipeline(dims: Dimensions, work_dir: Path, rows: int, csv_rows: int, repeats: int) -> Dict[str, Any]:
    """Time conversion, fit and batch building; return rows/s per stage."""
    parquet = synthetic_parquet(work_dir, rows)
    csv = synthetic_csv(work_dir, csv_rows)
    converted = Path(work_dir) / "converted.parquet"
    schema = aliexpress_schema()
    preprocessor = Preprocessor.fit([parquet], schema)

    timers: Dict[str, Callable[[], Any]] = {
        "csv_to_parquet": lambda: convert_csv_to_parquet(csv, converted),
        "fit_parquet": lambda: Preprocessor.fit([parquet], schema),
        "parquet_to_batches": lambda: read_all_batches(parquet, preprocessor, dims.batch_size),
        "csv_to_batches": lambda: read_all_batches(csv, preprocessor, dims.batch_size),
    }
    row_counts = {"csv_to_parquet": csv_rows, "fit_parquet": rows, "parquet_to_batches": rows, "csv_to_batches": csv_rows}
    logger.info("pipeline: %d parquet rows, %d CSV rows, %d repeats", rows, csv_rows, repeats)
    seconds = time_interleaved(timers, repeats, warmup=0)
    converted.unlink(missing_ok=True)
    return {
        "rows_per_second": {name: summary(values, row_counts[name]) for name, values in seconds.items()},
        "rows": row_counts,
        "batch_size": dims.batch_size,
    }


def describe(result: Dict[str, Any]) -> List[List[str]]:
    return [[f"pipeline {name}", f"{rate['median']:.0f} rows/s", f"{result['rows'][name]} rows"]
            for name, rate in result["rows_per_second"].items()]
