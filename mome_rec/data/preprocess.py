"""Vocabularies and dense statistics learnt from the training rows, and the transform they define.

For each sparse column the vocabulary is the sorted list of distinct raw ids in
the training rows. A raw id ``v`` maps to its position in that list, and any id
not seen in training (or a null string id) maps to the out-of-vocabulary index
``len(vocab)``, so a column's embedding table has ``len(vocab) + 1`` rows.
Dense columns are standardised::

    dense_out = (x - mean) / std        (std = 1 where the training std is 0)

with the population mean and standard deviation of the training rows.

Invalid values raise :class:`~mome_rec.errors.DataError` with one line
``"PATH row R column C: PROBLEM"``. ``R`` is the 1-based data row of the first
bad row within the file, not counting the header. The checked problems are a
null, non-integer or negative id (``sparse_kind`` ``int``), a missing, NaN or
infinite dense value, and a missing label or one other than 0 or 1.

Example::

    preprocessor = Preprocessor.fit(train_files, schema, holdout=10)
    for first_row, batch in iter_record_batches(path, preprocessor.columns(), 65536,
                                                column_types=preprocessor.csv_types()):
        arrays = preprocessor.transform(batch, path, first_row)  # arrays.sparse: N x F int64
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mome_rec.config import SchemaConfig
from mome_rec.data.reader import first_invalid_index, iter_record_batches
from mome_rec.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Arrays:
    """Model-ready arrays of N rows.

    Attributes:
        sparse: int64 N x F vocabulary indices, one column per sparse feature.
        dense: float32 N x D standardised dense features (D may be 0).
        labels: float32 N x T labels in {0, 1}, or None when read without labels.
        row_ids: the schema's row id column (N values), or None.
        row_index: int64 N, the 0-based row of each example within its file, or None.
    """

    sparse: np.ndarray
    dense: np.ndarray
    labels: Optional[np.ndarray] = None
    row_ids: Optional[np.ndarray] = None
    row_index: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.sparse)

    def take(self, indices) -> "Arrays":
        """Select rows by an integer index array (a copy) or a slice (views)."""
        if isinstance(indices, slice):
            return Arrays(*(None if values is None else values[indices] for values in self._fields()))
        # np.take copies whole rows; plain fancy indexing of a 2-D array is about twice as slow.
        return Arrays(*(None if values is None else np.take(values, indices, axis=0) for values in self._fields()))

    @staticmethod
    def concat(parts: Sequence["Arrays"]) -> "Arrays":
        """Concatenate row-wise (all parts must carry the same optional fields)."""
        if len(parts) == 1:
            return parts[0]
        fields = zip(*(part._fields() for part in parts))
        return Arrays(*(None if values[0] is None else np.concatenate(values) for values in fields))

    def _fields(self) -> Tuple[Any, ...]:
        return (self.sparse, self.dense, self.labels, self.row_ids, self.row_index)


class _Problems:
    """The first invalid value of a batch, over all its columns."""

    def __init__(self, path, rows: np.ndarray) -> None:
        self.path = path
        self.rows = rows
        self.first: Optional[Tuple[int, str, str]] = None

    def add(self, index: Optional[int], column: str, text: str) -> None:
        if index is not None and (self.first is None or index < self.first[0]):
            self.first = (int(index), column, text)

    def add_mask(self, mask: np.ndarray, column: str, describe) -> None:
        """Record the first ``True`` of ``mask``, described by ``describe(index)``."""
        if mask.any():
            index = int(np.argmax(mask))
            self.add(index, column, describe(index))

    def raise_first(self) -> None:
        if self.first is not None:
            index, column, text = self.first
            raise DataError(f"{self.path} row {int(self.rows[index]) + 1} column {column}: {text}")


def _first_null(array: pa.Array) -> Optional[int]:
    if array.null_count == 0:
        return None
    return int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))


def _int_ids(array: pa.Array, column: str, problems: _Problems) -> np.ndarray:
    """Parse integer ids (integer, integral float or integer-text columns) into int64, reading nulls as 0."""
    problems.add(_first_null(array), column, "missing id (null)")
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad = first_invalid_index(array, pa.int64())
        if bad is not None:
            problems.add(bad, column, f"non-integer id {array[bad].as_py()!r}")
            return np.zeros(len(array), dtype=np.int64)
        array = pc.cast(array, pa.int64())
    elif pa.types.is_floating(kind):
        values = array.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        problems.add_mask(~np.isfinite(values) | (values != np.round(values)), column,
                          lambda index: f"non-integer id {float(values[index])!r}")
        values = np.where(np.isfinite(values), values, 0)
        array = pa.array(values.astype(np.int64))
    elif not pa.types.is_integer(kind):
        problems.add(0, column, f"type {kind} cannot hold integer ids")
        return np.zeros(len(array), dtype=np.int64)

    values = array.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    problems.add_mask(values < 0, column, lambda index: f"negative id {values[index]}")
    return values


def _string_ids(array: pa.Array) -> pa.Array:
    if not pa.types.is_string(array.type):
        array = pc.cast(array, pa.string())
    return array


def _floats(array: pa.Array, column: str, problems: _Problems) -> np.ndarray:
    """Parse a numeric or numeric-text column into float64, reading nulls as NaN."""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad = first_invalid_index(array, pa.float64())
        if bad is not None:
            problems.add(bad, column, f"non-numeric value {array[bad].as_py()!r}")
            return np.zeros(len(array))
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        problems.add(0, column, f"type {kind} is not numeric")
        return np.zeros(len(array))
    return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)


def _dense_values(array: pa.Array, column: str, problems: _Problems) -> np.ndarray:
    problems.add(_first_null(array), column, "missing value (null)")
    values = _floats(array, column, problems)
    if np.isfinite(values).all():
        return values
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    problems.add_mask(np.isnan(values) & valid, column, lambda index: "NaN value")
    problems.add_mask(np.isinf(values), column, lambda index: f"infinite value {float(values[index])}")
    return values


def _label_values(array: pa.Array, column: str, problems: _Problems) -> np.ndarray:
    problems.add(_first_null(array), column, "missing label (null)")
    values = _floats(array, column, problems)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    problems.add_mask(valid & (values != 0) & (values != 1), column,
                      lambda index: f"label {values[index]:g} is not 0 or 1")
    return values


def _require_columns(batch: pa.RecordBatch, path, columns: Sequence[str]) -> None:
    names = set(batch.schema.names)
    for name in columns:
        if name not in names:
            raise DataError(f"{path}: missing column {name}")


class Preprocessor:
    """Maps raw columns to vocabulary indices, standardised dense values and float labels.

    Build one with :meth:`fit` (or :meth:`from_dict`), never by hand.

    Args:
        schema: which columns are sparse, dense, labels and the row id.
        vocabularies: sparse column -> sorted distinct training ids (int64 array or list of str).
        mean, std: dense column -> training mean and standard deviation (std > 0).
    """

    def __init__(
        self,
        schema: SchemaConfig,
        vocabularies: Dict[str, Any],
        mean: Dict[str, float],
        std: Dict[str, float],
    ) -> None:
        self.schema = schema
        self.string_ids = schema.sparse_kind == "string"
        self.vocabularies: Dict[str, Any] = {}
        for column in schema.sparse:
            if self.string_ids:
                self.vocabularies[column] = pa.array(list(vocabularies[column]), type=pa.string())
            else:
                self.vocabularies[column] = np.asarray(vocabularies[column], dtype=np.int64)
        self.mean = {column: float(mean[column]) for column in schema.dense}
        self.std = {column: float(std[column]) for column in schema.dense}
        self._mean = np.array([self.mean[column] for column in schema.dense], dtype=np.float64)
        self._std = np.array([self.std[column] for column in schema.dense], dtype=np.float64)
        self._lookup_tables = {} if self.string_ids else _lookup_tables(self.vocabularies)

    # ------------------------------------------------------------------ fit

    @classmethod
    def fit(
        cls,
        paths: Sequence[Path],
        schema: SchemaConfig,
        holdout: Optional[int] = None,
        read_rows: int = 65536,
    ) -> "Preprocessor":
        """Learn vocabularies and dense statistics in one streaming pass over the training rows.

        Args:
            paths: the training files.
            schema: the columns. Labels are read and validated too.
            holdout: when set, rows ``r`` (0-based within each file) with
                ``r % holdout == 0`` are validation rows and are skipped.
            read_rows: rows per read batch.
        """
        string_ids = schema.sparse_kind == "string"
        int_vocabularies = {column: np.zeros(0, dtype=np.int64) for column in schema.sparse}
        string_vocabularies: Dict[str, set] = {column: set() for column in schema.sparse}
        count = 0
        mean = np.zeros(len(schema.dense))
        squares = np.zeros(len(schema.dense))  # sum of squared deviations from the mean (M2)

        columns = list(dict.fromkeys(schema.sparse + schema.dense + schema.labels))
        column_types = _csv_types(schema, with_labels=True)
        for path in paths:
            for first_row, batch in iter_record_batches(path, columns, read_rows, column_types=column_types):
                rows = first_row + np.arange(batch.num_rows, dtype=np.int64)
                if holdout is not None:
                    keep = rows % holdout != 0
                    batch, rows = batch.filter(pa.array(keep)), rows[keep]
                if batch.num_rows == 0:
                    continue
                sparse, dense, _ = _parse(batch, path, rows, schema, with_labels=True)

                for column, values in zip(schema.sparse, sparse):
                    if string_ids:
                        string_vocabularies[column].update(pc.unique(values).drop_null().to_pylist())
                    else:
                        int_vocabularies[column] = np.union1d(int_vocabularies[column], np.unique(values))

                # Chan et al.'s pairwise update of the running mean and M2.
                batch_count = len(dense)
                batch_mean = dense.mean(axis=0)
                batch_squares = ((dense - batch_mean) ** 2).sum(axis=0)
                delta = batch_mean - mean
                total = count + batch_count
                mean = mean + delta * (batch_count / total)
                squares = squares + batch_squares + delta**2 * (count * batch_count / total)
                count = total

        if count == 0:
            names = ", ".join(str(path) for path in paths) or "(no files)"
            raise DataError(f"{names}: no training rows to fit the vocabularies and dense statistics")

        std = np.sqrt(squares / count)
        std = np.where(std > 0, std, 1.0)
        if string_ids:
            vocabularies = {column: sorted(values) for column, values in string_vocabularies.items()}
        else:
            vocabularies = int_vocabularies
        logger.info(
            "fitted the preprocessor on %d training rows: %s",
            count,
            ", ".join(f"{column}={len(vocabularies[column])}" for column in schema.sparse),
        )
        return cls(
            schema,
            vocabularies,
            dict(zip(schema.dense, mean.tolist())),
            dict(zip(schema.dense, std.tolist())),
        )

    # ------------------------------------------------------------ properties

    def num_embeddings(self, column: str) -> int:
        """Return the embedding table rows of ``column``: its vocabulary plus one out-of-vocabulary row."""
        return len(self.vocabularies[column]) + 1

    def table_sizes(self) -> Dict[str, int]:
        """Return sparse column -> :meth:`num_embeddings`, in schema order."""
        return {column: self.num_embeddings(column) for column in self.schema.sparse}

    def columns(self, with_labels: bool = True, with_row_id: bool = False) -> List[str]:
        """Return the columns that :meth:`transform` reads."""
        names = self.schema.sparse + self.schema.dense
        if with_labels:
            names = names + self.schema.labels
        if with_row_id and self.schema.row_id is not None:
            names = names + [self.schema.row_id]
        return list(dict.fromkeys(names))

    def csv_types(self, with_labels: bool = True) -> Dict[str, pa.DataType]:
        """Return the CSV parse types of the schema's columns, for :func:`iter_record_batches`."""
        return _csv_types(self.schema, with_labels)

    # ------------------------------------------------------------- transform

    def transform(
        self,
        batch: pa.RecordBatch,
        path,
        first_row: int,
        with_labels: bool = True,
        *,
        rows: Optional[np.ndarray] = None,
    ) -> Arrays:
        """Map a record batch to model arrays, validating every value.

        Args:
            batch: N rows with at least :meth:`columns` (``with_labels``).
            path: the file the batch came from, for error messages.
            first_row: 0-based row within the file of the batch's first row.
            with_labels: read and validate the label columns.
            rows: 0-based file rows of the batch's rows when they are not
                consecutive (a filtered batch); overrides ``first_row``.

        Returns:
            :class:`Arrays` with sparse N x F, dense N x D, labels N x T (or None),
            row_ids (when the schema names a row id and the batch has it) and row_index.
        """
        if rows is None:
            rows = first_row + np.arange(batch.num_rows, dtype=np.int64)
        sparse, dense, labels = _parse(batch, path, rows, self.schema, with_labels)

        indices = np.empty((batch.num_rows, len(self.schema.sparse)), dtype=np.int64)
        for field, (column, values) in enumerate(zip(self.schema.sparse, sparse)):
            indices[:, field] = self._lookup(column, values)
        dense -= self._mean
        dense /= self._std
        dense_out = dense.astype(np.float32)

        row_ids = None
        row_id = self.schema.row_id
        if row_id is not None and row_id in batch.schema.names:
            row_ids = batch.column(row_id).to_numpy(zero_copy_only=False)
        return Arrays(sparse=indices, dense=dense_out, labels=labels, row_ids=row_ids, row_index=rows)

    def _lookup(self, column: str, values) -> np.ndarray:
        vocabulary = self.vocabularies[column]
        out_of_vocabulary = len(vocabulary)
        if self.string_ids:
            found = pc.index_in(values, value_set=vocabulary)
            return found.fill_null(out_of_vocabulary).to_numpy(zero_copy_only=False).astype(np.int64)
        if out_of_vocabulary == 0:
            return np.zeros(len(values), dtype=np.int64)
        table = self._lookup_tables.get(column)
        if table is not None:
            # The ids are non-negative (checked by _parse); the table's last entry maps every larger id to OOV.
            return table[np.minimum(values, len(table) - 1)]
        position = np.searchsorted(vocabulary, values)
        known = vocabulary[np.minimum(position, out_of_vocabulary - 1)] == values
        return np.where(known, position, out_of_vocabulary)

    # --------------------------------------------------------- serialisation

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-serialisable dict from which :meth:`from_dict` rebuilds an identical preprocessor."""
        vocabularies = {}
        for column, vocabulary in self.vocabularies.items():
            vocabularies[column] = vocabulary.to_pylist() if self.string_ids else vocabulary.tolist()
        return {
            "schema": dataclasses.asdict(self.schema),
            "vocabularies": vocabularies,
            "mean": dict(self.mean),
            "std": dict(self.std),
        }

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "Preprocessor":
        """Rebuild a preprocessor from :meth:`to_dict` output."""
        schema = SchemaConfig(**state["schema"])
        return cls(schema, state["vocabularies"], state["mean"], state["std"])


LOOKUP_TABLE_MAX_ID = (1 << 20) - 2
"""Integer vocabularies whose largest id is at most this get a direct lookup table (8 MiB at most)."""


def _lookup_tables(vocabularies: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Return id -> index tables for the small-id vocabularies: ``table[id]``, OOV for unseen ids and at the end."""
    tables = {}
    for column, vocabulary in vocabularies.items():
        if len(vocabulary) == 0 or vocabulary[-1] > LOOKUP_TABLE_MAX_ID:
            continue
        table = np.full(int(vocabulary[-1]) + 2, len(vocabulary), dtype=np.int64)
        table[vocabulary] = np.arange(len(vocabulary), dtype=np.int64)
        tables[column] = table
    return tables


def _csv_types(schema: SchemaConfig, with_labels: bool) -> Dict[str, pa.DataType]:
    id_type = pa.string() if schema.sparse_kind == "string" else pa.int64()
    types = {column: pa.float64() for column in schema.dense}
    if with_labels:
        types.update({column: pa.float64() for column in schema.labels})
    types.update({column: id_type for column in schema.sparse})
    return types


def _parse(
    batch: pa.RecordBatch, path, rows: np.ndarray, schema: SchemaConfig, with_labels: bool
) -> Tuple[List[Any], np.ndarray, Optional[np.ndarray]]:
    """Validate and parse a batch: raw sparse ids per column, float64 N x D dense, float32 N x T labels."""
    _require_columns(batch, path, schema.sparse + schema.dense + (schema.labels if with_labels else []))
    problems = _Problems(path, rows)

    sparse = []
    for column in schema.sparse:
        array = batch.column(column)
        if schema.sparse_kind == "string":
            sparse.append(_string_ids(array))
        else:
            sparse.append(_int_ids(array, column, problems))

    dense = np.empty((batch.num_rows, len(schema.dense)), dtype=np.float64)
    for field, column in enumerate(schema.dense):
        dense[:, field] = _dense_values(batch.column(column), column, problems)

    labels = None
    if with_labels:
        labels = np.empty((batch.num_rows, len(schema.labels)), dtype=np.float32)
        for task, column in enumerate(schema.labels):
            labels[:, task] = _label_values(batch.column(column), column, problems)

    problems.raise_first()
    return sparse, dense, labels
