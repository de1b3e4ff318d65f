"""TorchRec batches streamed from files: rank partition, holdout split, bounded shuffle and resume.

With ``holdout = h`` the rows ``r`` of a file with ``r % h == 0`` form the
validation split (``split="eval"``) and the others the training split
(``split="train"``); without a holdout every row is in the split. A row's
global position ``g`` counts the rows of its split in earlier files and before
it in its file, and the row belongs to rank ``g % world_size``, so ranks differ
by at most one row per split.

Example::

    stream = BatchStream(files, preprocessor, batch_size=2048, shuffle=True, rank=0, world_size=2)
    stream.set_epoch(3)
    for batch in stream.iterate(skip_batches=100):  # resume after 100 batches of epoch 3
        ...  # batch.sparse_features: KeyedJaggedTensor, batch.labels: B x T
"""

import logging
import math
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.data.reader import count_rows, file_format, iter_record_batches, parquet_row_groups
from mome_rec.errors import DataError

logger = logging.getLogger(__name__)


def make_batch(arrays: Arrays, keys: List[str]) -> Batch:
    """Build a TorchRec batch with one id per row and key.

    The KeyedJaggedTensor stores values key-major, all B ids of ``keys[0]``
    first, then those of ``keys[1]``, and so on, with every length 1.

    Args:
        arrays: B rows, ``sparse`` B x F with F = ``len(keys)``.
        keys: the sparse column names, in the order of ``arrays.sparse``'s columns.

    Returns:
        ``Batch(dense_features=B x D float32, sparse_features=KJT, labels=B x T float32)``;
        labels is B x 0 when ``arrays.labels`` is None.
    """
    rows, fields = arrays.sparse.shape
    if fields != len(keys):
        raise ValueError(f"arrays.sparse has {fields} columns but {len(keys)} keys were given")
    values = torch.from_numpy(np.ascontiguousarray(arrays.sparse.T).reshape(-1))
    # Every key has B ids, so the per-key lengths and offsets are known. KeyedJaggedTensor.from_lengths_sync
    # would compute them by summing the lengths of every batch.
    sparse = KeyedJaggedTensor(
        keys=list(keys),
        values=values,
        lengths=torch.ones(rows * fields, dtype=torch.int32),
        stride=rows,
        length_per_key=[rows] * fields,
        offset_per_key=[rows * field for field in range(fields + 1)],
    )
    dense = torch.from_numpy(np.ascontiguousarray(arrays.dense, dtype=np.float32))
    if arrays.labels is None:
        labels = torch.zeros((rows, 0), dtype=torch.float32)
    else:
        labels = torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.float32))
    return Batch(dense_features=dense, sparse_features=sparse, labels=labels)


def _split_count(rows, holdout: Optional[int], held_out: bool):
    """Number of rows of the split among file rows ``0 .. rows - 1`` (int or array)."""
    if holdout is None:
        return rows
    held = (rows + holdout - 1) // holdout
    return held if held_out else rows - held


def _selection(split_offset: int, rows: np.ndarray, rank, world_size, holdout, held_out) -> np.ndarray:
    """Mask of the file rows ``rows`` that are in the split and belong to ``rank``."""
    positions = split_offset + _split_count(rows, holdout, held_out)
    if holdout is None:
        in_split = np.ones(len(rows), dtype=bool)
    else:
        in_split = (rows % holdout == 0) if held_out else (rows % holdout != 0)
    return in_split & (positions % world_size == rank)


class BatchStream:
    """An iterable of TorchRec :class:`Batch` over one split of some files, for one rank.

    Args:
        paths: CSV or parquet files, read in this order.
        preprocessor: maps columns to model arrays (and validates them).
        batch_size: rows per batch.
        split: ``"train"`` or ``"eval"``; with ``holdout`` it selects the
            training rows (``r % holdout != 0``) or the held-out rows.
        shuffle: shuffle per epoch (see :meth:`set_epoch`), seeded by
            ``(seed, epoch, rank)``: the order of read chunks (parquet row
            groups, whole CSV files) and of rows within a buffer.
        seed: shuffle seed.
        rank, world_size: this process's share of the rows (see the module doc).
        holdout: every ``holdout``-th row of each file is validation, or None.
        drop_last: drop a final partial batch; default True for train, False for eval.
        read_rows: rows per read batch.
        shuffle_buffer_rows: rows held for shuffling; memory is bounded by it
            and ``read_rows``, whatever the file sizes.
        with_labels: read the label columns (False for scoring unlabelled files).
        with_row_ids: read the schema's row id column into :attr:`Arrays.row_ids`.

    NOTE: a CSV file is one chunk, so shuffling mixes its rows only within the
    buffer. Convert large CSV files to parquet for a better shuffle.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessor: Preprocessor,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        holdout: Optional[int] = None,
        drop_last: Optional[bool] = None,
        read_rows: int = 65536,
        shuffle_buffer_rows: int = 262144,
        with_labels: bool = True,
        with_row_ids: bool = False,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if batch_size <= 0 or read_rows <= 0 or shuffle_buffer_rows <= 0:
            raise ValueError("batch_size, read_rows and shuffle_buffer_rows must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if holdout is not None and holdout < 1:
            raise ValueError(f"holdout must be >= 1, got {holdout}")
        self.paths = [Path(path) for path in paths]
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.split = split
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.holdout = holdout
        self.drop_last = (split == "train") if drop_last is None else drop_last
        self.read_rows = read_rows
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.with_labels = with_labels
        self.with_row_ids = with_row_ids
        self.epoch = 0
        self._chunks: Optional[List[Tuple[int, Optional[int], int, int]]] = None
        self._offsets: Optional[List[int]] = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffled order the next iteration follows."""
        self.epoch = epoch

    # ----------------------------------------------------------------- sizes

    def _plan(self) -> List[Tuple[int, Optional[int], int, int]]:
        """Return the read chunks ``(file index, row group or None, first row, rows)``, computed once."""
        if self._chunks is None:
            # offsets[k]: rows of this stream's split in files 0 .. k-1
            chunks, offsets, offset = [], [], 0
            held_out = self.split == "eval"
            for index, path in enumerate(self.paths):
                offsets.append(offset)
                if file_format(path) == "parquet":
                    groups = parquet_row_groups(path)
                    chunks.extend((index, group, first, rows) for group, (first, rows) in enumerate(groups))
                    file_rows = sum(rows for _, rows in groups)
                else:
                    file_rows = count_rows(path)
                    chunks.append((index, None, 0, file_rows))
                if file_rows == 0:
                    raise DataError(f"{path}: empty file (no rows)")
                offset += _split_count(file_rows, self.holdout, held_out)
            self._chunks, self._offsets = chunks, offsets
        return self._chunks

    def num_rows(self) -> int:
        """Return the number of rows this rank receives per epoch."""
        held_out = self.split == "eval"
        total = 0
        for index, _, first, rows in self._plan():
            total += _count_selected(self._offsets[index], first, rows, self.rank, self.world_size, self.holdout, held_out)
        return total

    def __len__(self) -> int:
        rows = self.num_rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    # ------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, skip_batches: int = 0, max_batches: Optional[int] = None) -> Iterator[Batch]:
        """Yield the epoch's batches after the first ``skip_batches``, at most ``max_batches`` of them.

        The order is fixed by ``(seed, epoch, rank)``, so skipping resumes an
        interrupted epoch exactly. Skipped batches are still read and
        validated, but not converted to tensors.
        """
        keys = list(self.preprocessor.schema.sparse)
        for arrays in self.iter_arrays(skip_batches, max_batches):
            yield make_batch(arrays, keys)

    def iter_arrays(self, skip_batches: int = 0, max_batches: Optional[int] = None) -> Iterator[Arrays]:
        """Yield the batches of :meth:`iterate` as :class:`Arrays`.

        Each carries row_index, and row_ids when the stream reads them (``with_row_ids``).
        """
        if max_batches is not None and max_batches <= 0:
            return
        produced = 0
        for index, arrays in enumerate(self._batches()):
            if index < skip_batches:
                continue
            yield arrays
            produced += 1
            if max_batches is not None and produced >= max_batches:
                return

    def _batches(self) -> Iterator[Arrays]:
        if self.shuffle:
            return self._shuffled_batches()
        return self._ordered_batches()

    def _ordered_batches(self) -> Iterator[Arrays]:
        pending: List[Arrays] = []
        pending_rows = 0
        for arrays in self._pieces(self._plan()):
            pending.append(arrays)
            pending_rows += len(arrays)
            if pending_rows >= self.batch_size:
                merged = Arrays.concat(pending)
                full = len(merged) // self.batch_size * self.batch_size
                yield from self._split(merged.take(slice(0, full)))
                rest = merged.take(slice(full, None))
                pending, pending_rows = ([rest] if len(rest) else []), len(rest)
        yield from self._finish(pending)

    def _shuffled_batches(self) -> Iterator[Arrays]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        chunks = self._plan()
        chunks = [chunks[index] for index in rng.permutation(len(chunks))]

        # Once the buffer is full, shuffle it and emit whole batches until half of it is left,
        # so rows of consecutive chunks mix.
        keep = self.shuffle_buffer_rows // 2
        buffer: List[Arrays] = []
        buffered = 0
        for arrays in self._pieces(chunks):
            buffer.append(arrays)
            buffered += len(arrays)
            if buffered < self.shuffle_buffer_rows:
                continue
            merged = Arrays.concat(buffer).take(rng.permutation(buffered))
            emit = (buffered - keep) // self.batch_size * self.batch_size
            yield from self._split(merged.take(slice(0, emit)))
            rest = merged.take(slice(emit, None))
            buffer, buffered = [rest], len(rest)
        if buffered:
            merged = Arrays.concat(buffer).take(rng.permutation(buffered))
            buffer = [merged]
        yield from self._finish(buffer)

    def _split(self, arrays: Arrays) -> Iterator[Arrays]:
        for start in range(0, len(arrays), self.batch_size):
            yield arrays.take(slice(start, start + self.batch_size))

    def _finish(self, pending: List[Arrays]) -> Iterator[Arrays]:
        """Yield the remaining rows: whole batches, then a partial one unless ``drop_last``."""
        pending = [arrays for arrays in pending if len(arrays)]
        if not pending:
            return
        merged = Arrays.concat(pending)
        full = len(merged) // self.batch_size * self.batch_size
        yield from self._split(merged.take(slice(0, full)))
        if len(merged) > full and not self.drop_last:
            yield merged.take(slice(full, None))

    def _pieces(self, chunks) -> Iterator[Arrays]:
        """Read, filter (rank and holdout) and transform the chunks in the given order."""
        columns = self.preprocessor.columns(self.with_labels, self.with_row_ids)
        column_types = self.preprocessor.csv_types(self.with_labels)
        held_out = self.split == "eval"
        for index, group, _, _ in chunks:
            path = self.paths[index]
            row_groups = None if group is None else [group]
            for first_row, batch in iter_record_batches(
                path, columns, self.read_rows, column_types=column_types, row_groups=row_groups
            ):
                rows = first_row + np.arange(batch.num_rows, dtype=np.int64)
                mask = _selection(self._offsets[index], rows, self.rank, self.world_size, self.holdout, held_out)
                if not mask.any():
                    continue
                if not mask.all():
                    batch, rows = batch.filter(pa.array(mask)), rows[mask]
                yield self.preprocessor.transform(batch, path, first_row, self.with_labels, rows=rows)


def _count_selected(
    split_offset: int, first_row: int, rows: int, rank: int, world_size: int, holdout: Optional[int], held_out: bool
) -> int:
    """Count the rows of ``rank`` in file rows ``first_row .. first_row + rows - 1`` of a file whose
    split rows start at global position ``split_offset``."""
    start = split_offset + _split_count(first_row, holdout, held_out)
    stop = split_offset + _split_count(first_row + rows, holdout, held_out)

    def below(position: int) -> int:  # positions p < position with p % world_size == rank
        return max(0, (position - rank + world_size - 1) // world_size)

    return below(stop) - below(start)
