"""Batch scoring of CSV and parquet files with an exported model, split over independent ranks.

The inputs (files, or folders of them, in name order) are cut into parts: one
part per parquet row group and one per CSV file. Part ``k`` belongs to rank
``k % world_size`` and is written to ``OUT/part-FFFFF-GGGGG.parquet`` (input
file ``F``, row group ``G``), with the row id column and one ``TASK_score``
column (the predicted probability) per task, rows in input order. The part
names do not depend on the world size, so any number of ranks yields the same
files.

A part is written to a hidden temporary name and renamed when complete, so a
rerun after a kill skips the finished parts and rewrites the others: every
input row appears exactly once. ``OUT/_manifest.json`` records the model and
inputs, and a rerun into a folder made for another model or other inputs stops
with an error. The rank that finds every part present writes ``OUT/_SUCCESS``.
Readers such as ``pyarrow.dataset`` skip names that start with ``.`` or ``_``.

Ranks share nothing but the output folder: each loads the (small) model and
scores its parts on its own, so no process group is needed.

Example::

    summary = score_files("model.mome", ["data/test.parquet"], "scores", rank=0, world_size=1)
    summary.rows, summary.parts_written, summary.seconds
"""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mome_rec.data.reader import file_format, iter_record_batches, parquet_row_groups
from mome_rec.data.sources import expand_paths
from mome_rec.errors import InputError
from mome_rec.inference import LoadedModel, load_model

logger = logging.getLogger(__name__)

MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
ROW_INDEX_COLUMN = "row_index"
"""The id column written when the schema names no row id: the 0-based row within the input file."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One unit of scoring work: a parquet row group or a whole CSV file.

    Attributes:
        file_index: position of the file among the expanded inputs.
        path: the input file.
        row_group: the parquet row group, or None for a CSV file.
        rows: the part's rows when the file's metadata gives them (parquet), else None.
    """

    file_index: int
    path: Path
    row_group: Optional[int]
    rows: Optional[int]

    @property
    def name(self) -> str:
        return f"part-{self.file_index:05d}-{self.row_group or 0:05d}.parquet"


@dataclasses.dataclass
class ScoreSummary:
    """Counts of one rank's run: rows scored, parts written, parts skipped as already complete, wall seconds."""

    rows: int
    parts_written: int
    parts_skipped: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def plan_parts(files: Sequence[Path]) -> List[Part]:
    """Return the parts of ``files`` in order: each non-empty parquet row group, each CSV file."""
    parts: List[Part] = []
    for index, path in enumerate(files):
        if file_format(path) == "parquet":
            for group, (_, rows) in enumerate(parquet_row_groups(path)):
                if rows > 0:
                    parts.append(Part(index, Path(path), group, rows))
        else:
            parts.append(Part(index, Path(path), None, None))
    return parts


def rank_parts(parts: Sequence[Part], rank: int, world_size: int) -> List[Part]:
    """Return the parts of ``rank``: every ``world_size``-th part starting at ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"RANK={rank} and WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    return list(parts[rank::world_size])


def score_files(
    model_path: Path,
    inputs: Sequence[Path],
    out_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_rows: int = 65536,
    progress: bool = True,
) -> ScoreSummary:
    """Score this rank's parts of ``inputs`` into ``out_dir`` (see the module doc).

    Args:
        model_path: a file written by ``mome-rec export``.
        inputs: CSV or parquet files, or folders of them.
        out_dir: the output folder, shared by all ranks.
        rank, world_size: this process's share of the parts.
        batch_rows: rows read and scored at once; memory grows with it and with
            the largest parquet row group.
        progress: show a tqdm bar (rank 0 only).

    Invalid input raises :class:`~mome_rec.errors.DataError` as in training,
    and the part being written is discarded.
    """
    if batch_rows <= 0:
        raise InputError(f"--batch-rows must be positive, got {batch_rows}")
    started = time.perf_counter()
    loaded = load_model(model_path)
    files = expand_paths(inputs)
    parts = plan_parts(files)
    mine = rank_parts(parts, rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, _manifest(model_path, loaded, files, parts))

    pending = [part for part in mine if not (out_dir / part.name).is_file()]
    skipped = len(mine) - len(pending)
    if skipped:
        logger.info("rank %d: %d of its %d parts are already complete", rank, skipped, len(mine))
    known = [part.rows for part in pending]
    total = sum(known) if None not in known else None

    rows = 0
    with tqdm(total=total, unit="rows", unit_scale=True, desc=f"scoring (rank {rank})",
              disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        with torch.inference_mode():
            for part in pending:
                for scored in _write_part(loaded, part, out_dir, batch_rows):
                    rows += scored
                    bar.update(scored)

    if all((out_dir / part.name).is_file() for part in parts):
        _write_atomically(out_dir / SUCCESS_FILE, f"{len(parts)} parts\n")
    summary = ScoreSummary(rows, len(pending), skipped, time.perf_counter() - started)
    logger.info(
        "rank %d of %d: scored %d rows into %d parts (%d already complete) in %.1f s, %.0f rows/s; output in %s",
        rank, world_size, summary.rows, summary.parts_written, summary.parts_skipped, summary.seconds,
        summary.rows_per_second, out_dir,
    )
    return summary


def _write_part(loaded: LoadedModel, part: Part, out_dir: Path, batch_rows: int) -> Iterator[int]:
    """Score one part into a temporary file, rename it into place, and yield the rows of each batch."""
    final = out_dir / part.name
    for stale in out_dir.glob(f".{part.name}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a killed run
    temporary = out_dir / f".{part.name}.tmp-{os.getpid()}"

    preprocessor = loaded.preprocessor
    row_id = preprocessor.schema.row_id
    columns = preprocessor.columns(with_labels=False, with_row_id=True)
    row_groups = None if part.row_group is None else [part.row_group]
    writer: Optional[pq.ParquetWriter] = None
    try:
        for first_row, batch in iter_record_batches(
            part.path, columns, batch_rows, column_types=preprocessor.csv_types(with_labels=False), row_groups=row_groups
        ):
            arrays = preprocessor.transform(batch, part.path, first_row, with_labels=False)
            scores = loaded.model.predict(torch.from_numpy(arrays.dense), torch.from_numpy(arrays.sparse)).numpy()
            if row_id is not None:
                ids = batch.column(row_id)
                id_name = row_id
            else:
                ids = pa.array(first_row + np.arange(batch.num_rows, dtype=np.int64))
                id_name = ROW_INDEX_COLUMN
            table = pa.table(
                [ids] + [pa.array(scores[:, task]) for task in range(scores.shape[1])],
                names=[id_name] + score_columns(loaded.tasks),
            )
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table)
            yield batch.num_rows
        if writer is None:
            raise InputError(f"{part.path}: no rows to score")
        writer.close()
        writer = None
        _fsync(temporary)
        os.replace(temporary, final)
    finally:
        if writer is not None:
            writer.close()
        temporary.unlink(missing_ok=True)


def score_columns(tasks: Sequence[str]) -> List[str]:
    """Return the score column names: ``TASK_score`` per task."""
    return [f"{task}_score" for task in tasks]


def _manifest(model_path: Path, loaded: LoadedModel, files: Sequence[Path], parts: Sequence[Part]) -> Dict[str, Any]:
    """Describe the job so that a rerun into the same folder can check it is the same job."""
    return {
        "model": {"bytes": Path(model_path).stat().st_size, "payload_crc32": loaded.header["payload_crc32"]},
        "inputs": [{"path": str(Path(path).resolve()), "bytes": Path(path).stat().st_size} for path in files],
        "parts": [part.name for part in parts],
        "score_columns": score_columns(loaded.tasks),
    }


def _check_manifest(out_dir: Path, manifest: Dict[str, Any]) -> None:
    """Write the manifest, or check that the one present describes the same job."""
    path = out_dir / MANIFEST_FILE
    if path.is_file():
        try:
            present = json.loads(path.read_text())
        except json.JSONDecodeError:
            present = None
        if present != manifest:
            raise InputError(
                f"{out_dir}: contains the output of another scoring job ({MANIFEST_FILE} names another model or "
                "other inputs); choose a new --out folder or delete this one"
            )
        return
    _write_atomically(path, json.dumps(manifest, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    temporary.write_text(text)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())
