"""Resolve a data config to the train, validation and test files and their schema.

Three sources:

* ``synthetic``: generated once into the cache (see :mod:`mome_rec.data.synthetic`).
* ``census``: the UCI Adult parquet file, turned into two tasks and split by
  row position ``i``: ``i % 5 == 0`` test, ``i % 5 == 1`` validation, else train.
* ``files``: CSV or parquet files or folders named in the config.

Prepared files live under ``data.cache_dir``, else ``$MOME_REC_CACHE``, else
``~/.cache/mome_rec``. Several processes may prepare the same folder at once:
each builds into its own temporary folder and renames it into place, and an
advisory file lock makes the others wait instead of building it again.

Example::

    splits = resolve_splits(config.data)
    splits.train       # [Path(".../synthetic-1a2b3c4d5e6f/train.parquet")]
    splits.holdout     # None, or h: every h-th training row is validation
"""

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mome_rec.config import DataConfig, SchemaConfig
from mome_rec.data.reader import CSV_SUFFIXES, PARQUET_SUFFIXES, file_format
from mome_rec.data.synthetic import GENERATOR_VERSION, aliexpress_schema, write_synthetic
from mome_rec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CENSUS_CATEGORICAL = ["workclass", "education", "occupation", "relationship", "race", "gender", "native-country"]
CENSUS_NUMERICAL = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
CENSUS_LABELS = ["income", "never_married"]
_CENSUS_VERSION = 1


@dataclasses.dataclass
class SplitFiles:
    """The files of each split.

    Attributes:
        train, validation, test: CSV or parquet files, read in this order.
        holdout: when not None, the validation split is the rows of ``train``
            whose 0-based row index ``r`` within its file has ``r % holdout == 0``,
            and training uses the other rows. ``validation`` is then empty.
        schema: the columns of every file.
    """

    train: List[Path]
    validation: List[Path]
    test: List[Path]
    holdout: Optional[int]
    schema: SchemaConfig


def census_schema() -> SchemaConfig:
    """Return the schema of the prepared census files: string categories, float numbers, two labels."""
    return SchemaConfig(
        sparse=list(CENSUS_CATEGORICAL),
        dense=list(CENSUS_NUMERICAL),
        labels=list(CENSUS_LABELS),
        row_id=None,
        sparse_kind="string",
    )


def cache_root(data: DataConfig) -> Path:
    """Return the folder for prepared data: ``data.cache_dir``, ``$MOME_REC_CACHE`` or ``~/.cache/mome_rec``."""
    root = data.cache_dir or os.environ.get("MOME_REC_CACHE") or "~/.cache/mome_rec"
    return Path(root).expanduser()


def expand_paths(entries: Iterable) -> List[Path]:
    """Expand files and folders into a list of files.

    A folder contributes its ``.csv``, ``.csv.gz``, ``.parquet`` and ``.pq``
    files (not recursively, hidden names skipped), sorted by name. A missing
    path, an unsupported file or a folder without data files raises DataError.
    """
    files: List[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(
                child
                for child in path.iterdir()
                if child.is_file()
                and not child.name.startswith(".")
                and child.name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES)
            )
            if not found:
                raise DataError(f"{path}: folder contains no .csv or .parquet files")
            files.extend(found)
        elif path.is_file():
            file_format(path)
            files.append(path)
        else:
            raise DataError(f"{path}: file or folder not found")
    return files


def resolve_splits(data: DataConfig) -> SplitFiles:
    """Return the split files of ``data``, preparing synthetic or census files in the cache first."""
    if data.source == "synthetic":
        return _synthetic_splits(data)
    if data.source == "census":
        return _census_splits(data)
    if data.source == "files":
        return _file_splits(data)
    raise ConfigError(f"data.source must be synthetic, census or files, got {data.source!r}")


def _holdout(data: DataConfig) -> int:
    holdout = round(1.0 / data.validation_fraction)
    if holdout < 2:
        raise ConfigError(
            f"data.validation_fraction={data.validation_fraction} would hold out every training row; "
            "use a value of at most 0.66"
        )
    return holdout


def _synthetic_splits(data: DataConfig) -> SplitFiles:
    cfg = data.synthetic
    if cfg.train_rows <= 0:
        raise ConfigError(f"data.synthetic.train_rows must be positive, got {cfg.train_rows}")
    settings = dict(dataclasses.asdict(cfg), generator_version=GENERATOR_VERSION)
    key = _short_hash(json.dumps(settings, sort_keys=True))
    folder = _build_once(cache_root(data) / f"synthetic-{key}", lambda directory: write_synthetic(directory, cfg))

    schema = data.schema if data.schema.sparse else aliexpress_schema()
    validation = [folder / "validation.parquet"] if cfg.validation_rows > 0 else []
    test = [folder / "test.parquet"] if cfg.test_rows > 0 else []
    holdout = None if validation else _holdout(data)
    return SplitFiles([folder / "train.parquet"], validation, test, holdout, schema)


def _census_splits(data: DataConfig) -> SplitFiles:
    if data.path is None:
        raise ConfigError("data.path is required for the census source")
    source = Path(data.path)
    try:
        stat = source.stat()
    except FileNotFoundError:
        raise DataError(f"{source}: file not found") from None
    key = _short_hash(f"{_CENSUS_VERSION}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    folder = _build_once(cache_root(data) / f"census-{key}", lambda directory: prepare_census(source, directory))

    schema = data.schema if data.schema.sparse else census_schema()
    return SplitFiles(
        [folder / "train.parquet"], [folder / "validation.parquet"], [folder / "test.parquet"], None, schema
    )


def _file_splits(data: DataConfig) -> SplitFiles:
    schema = data.schema
    if not schema.sparse:
        raise ConfigError("data.schema.sparse must name at least one sparse column for the files source")
    if not schema.labels:
        raise ConfigError("data.schema.labels must name at least one label column")
    if not data.train:
        raise ConfigError("data.train is required for the files source")
    validation = expand_paths(data.validation)
    holdout = None if validation else _holdout(data)
    return SplitFiles(expand_paths(data.train), validation, expand_paths(data.test), holdout, schema)


def prepare_census(source: Path, directory: Path) -> dict:
    """Write the census splits as ``train``/``validation``/``test.parquet`` into ``directory``.

    Labels (int64 0/1): ``income`` is 1 where the income starts with ``>50K``,
    ``never_married`` is 1 where marital-status is ``Never-married``. Features:
    the categorical columns as strings and the numerical ones as float64;
    marital-status and the raw income are dropped. Row ``i`` (0-based) goes to
    test when ``i % 5 == 0``, to validation when ``i % 5 == 1``, else to train.
    """
    try:
        table = pq.read_table(source)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{source}: not a readable parquet file ({error})") from error
    for name in CENSUS_CATEGORICAL + CENSUS_NUMERICAL + ["marital-status", "income"]:
        if name not in table.column_names:
            raise DataError(f"{source}: missing column {name}")
    for name in ("marital-status", "income"):
        nulls = table.column(name).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            raise DataError(f"{source} row {int(np.argmax(nulls)) + 1} column {name}: missing value (null)")

    columns = {name: pc.cast(table.column(name), pa.string()) for name in CENSUS_CATEGORICAL}
    columns.update({name: pc.cast(table.column(name), pa.float64()) for name in CENSUS_NUMERICAL})
    income = pc.utf8_trim_whitespace(pc.cast(table.column("income"), pa.string()))
    marital = pc.utf8_trim_whitespace(pc.cast(table.column("marital-status"), pa.string()))
    columns["income"] = pc.cast(pc.starts_with(income, ">50K"), pa.int64())
    columns["never_married"] = pc.cast(pc.equal(marital, "Never-married"), pa.int64())
    prepared = pa.table(columns)

    fold = np.arange(prepared.num_rows) % 5
    paths = {}
    for split, mask in (("train", fold >= 2), ("validation", fold == 1), ("test", fold == 0)):
        paths[split] = Path(directory) / f"{split}.parquet"
        pq.write_table(prepared.filter(pa.array(mask)), paths[split])
    logger.info("prepared census splits from %s in %s", source, directory)
    return paths


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _build_once(folder: Path, build: Callable[[Path], object]) -> Path:
    """Return ``folder``, first building it with ``build(temporary folder)`` if it does not exist.

    Only complete folders are renamed into place, so an existing folder is
    always complete. The lock only saves duplicate work: where ``flock`` is
    unsupported, concurrent builders race and the losers discard their copy.
    """
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            logger.warning("cannot lock %s (%s); building without a lock", lock.name, error)
        if folder.is_dir():
            return folder

        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            logger.info("preparing %s", folder)
            build(temporary)
            try:
                os.rename(temporary, folder)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not folder.is_dir():
                    raise
                logger.info("%s was prepared by another process", folder)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary)
    return folder
