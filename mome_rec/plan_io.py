"""Sharding plans saved as JSON by ``mome-rec plan`` and read back by ``mome-rec train --plan``.

A plan file records the cluster it was made for (world size, ranks per host,
compute device) and, per embedding table, its shape, sharding type, compute
kernel, ranks and shards::

    {"format": "mome_rec.sharding_plan/1", "world_size": 16, "local_world_size": 8,
     "compute_device": "cuda", "batch_size": 2048,
     "tables": {"t_categorical_7": {"rows": 51, "dim": 128, "sharding_type": "table_wise",
                                    "compute_kernel": "fused", "ranks": [3],
                                    "shards": [{"offsets": [0, 0], "sizes": [51, 128], "placement": "rank:3/cuda:3"}]}},
     "estimates": [...]}

:func:`load_plan_for` rejects, with one line, a plan whose world size,
compute device, table names or embedding dimension differ from the job;
:func:`check_table_rows` does the same for the table sizes, which are known
only once the preprocessor has read the training data.
"""

import dataclasses
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import CacheParams, ParameterSharding, ShardingPlan

from mome_rec.config import Config, SchemaConfig
from mome_rec.errors import ConfigError, InputError
from mome_rec.planning import SPARSE_MODULE, PlanReport, table_name

PLAN_FORMAT = "mome_rec.sharding_plan/1"

_CACHE_FIELDS = ("algorithm", "load_factor", "reserved_memory", "prefetch_pipeline")
_ENUM_FIELDS = {"bounds_check_mode", "output_dtype", "algorithm"}


@dataclasses.dataclass
class SavedPlan:
    """A sharding plan read from a file, with what it was made for.

    Attributes:
        sharding_plan: the plan to give DistributedModelParallel.
        world_size, local_world_size, compute_device: the cluster it was made for.
        table_shapes: table name -> (rows, dim).
        source: the file it was read from, for messages.
    """

    sharding_plan: ShardingPlan
    world_size: int
    local_world_size: int
    compute_device: str
    table_shapes: Dict[str, List[int]]
    source: str


# ------------------------------------------------------------------- schema


def config_schema(config: Config) -> SchemaConfig:
    """Return the schema the job will use: the config's, or the built-in one of the synthetic or census source."""
    if config.data.schema.sparse:
        return config.data.schema
    if config.data.source == "synthetic":
        from mome_rec.data.synthetic import aliexpress_schema

        return aliexpress_schema()
    if config.data.source == "census":
        from mome_rec.data.sources import census_schema

        return census_schema()
    raise ConfigError(f"data.schema.sparse must name at least one sparse column for the {config.data.source} source")


def configured_table_rows(config: Config) -> Optional[Dict[str, int]]:
    """Return ``distributed.table_rows`` (sparse column -> rows) if it covers every sparse column, else None.

    ConfigError for a column that is not sparse or a size below 1.
    """
    rows = config.distributed.table_rows
    if not rows:
        return None
    columns = config_schema(config).sparse
    for column, size in rows.items():
        if column not in columns:
            raise ConfigError(f"distributed.table_rows.{column}: {column} is not a sparse column")
        if size < 1:
            raise ConfigError(f"distributed.table_rows.{column} must be at least 1, got {size}")
    missing = [column for column in columns if column not in rows]
    if missing:
        raise ConfigError(f"distributed.table_rows: no size for {', '.join(missing)}")
    return {column: rows[column] for column in columns}


# --------------------------------------------------------------------- write


def plan_to_dict(plan: ShardingPlan, report: PlanReport) -> Dict[str, Any]:
    """Return the JSON form of ``plan`` and its report."""
    shardings = plan.plan.get(SPARSE_MODULE, {})
    tables = {}
    for placement in report.tables:
        sharding = shardings[placement.name]
        entry: Dict[str, Any] = {
            "rows": placement.rows,
            "dim": placement.dim,
            "sharding_type": sharding.sharding_type,
            "compute_kernel": sharding.compute_kernel,
            "ranks": list(sharding.ranks or []),
            "shards": None,
        }
        if sharding.sharding_spec is not None:
            entry["shards"] = [
                {"offsets": list(shard.shard_offsets), "sizes": list(shard.shard_sizes), "placement": str(shard.placement)}
                for shard in sharding.sharding_spec.shards
            ]
        if sharding.key_value_params is not None:
            raise ValueError(f"{placement.name}: key-value (SSD) tables cannot be saved in a plan file")
        for field in ("enforce_hbm", "stochastic_rounding", "bounds_check_mode", "output_dtype"):
            value = getattr(sharding, field)
            if value is not None:
                entry[field] = value.name if isinstance(value, Enum) else value
        if sharding.cache_params is not None:
            entry["cache_params"] = {
                field: (value.name if isinstance(value, Enum) else value)
                for field in _CACHE_FIELDS
                if (value := getattr(sharding.cache_params, field)) is not None
            }
        tables[placement.name] = entry
    return {
        "format": PLAN_FORMAT,
        "world_size": report.world_size,
        "local_world_size": report.local_world_size,
        "compute_device": report.compute_device,
        "batch_size": report.batch_size,
        "tables": tables,
        "estimates": [dataclasses.asdict(rank) for rank in report.ranks],
    }


def save_plan(path: Path, plan: ShardingPlan, report: PlanReport) -> None:
    """Write the plan as JSON to a temporary name beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(plan_to_dict(plan, report), indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------- read


def read_plan(path: Path) -> SavedPlan:
    """Read a plan file; InputError naming the file and key for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: plan file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno}") from error
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise InputError(f"{path}: not a mome-rec plan file (expected format {PLAN_FORMAT!r})")
    try:
        tables = raw["tables"]
        shardings = {name: _parameter_sharding(entry) for name, entry in tables.items()}
        shapes = {name: [int(entry["rows"]), int(entry["dim"])] for name, entry in tables.items()}
        return SavedPlan(
            sharding_plan=ShardingPlan({SPARSE_MODULE: shardings}),
            world_size=int(raw["world_size"]),
            local_world_size=int(raw["local_world_size"]),
            compute_device=str(raw["compute_device"]),
            table_shapes=shapes,
            source=str(path),
        )
    except KeyError as error:
        raise InputError(f"{path}: missing key {error.args[0]}") from error
    except (TypeError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: invalid plan entry: {error}") from error


def _parameter_sharding(entry: Dict[str, Any]) -> ParameterSharding:
    from fbgemm_gpu.tbe.cache.cache_config import CacheAlgorithm
    from fbgemm_gpu.tbe.config.embedding_config import BoundsCheckMode
    from torchrec.types import DataType

    enums = {"bounds_check_mode": BoundsCheckMode, "output_dtype": DataType, "algorithm": CacheAlgorithm}
    spec = None
    if entry["shards"] is not None:
        spec = EnumerableShardingSpec([
            ShardMetadata(shard_offsets=list(shard["offsets"]), shard_sizes=list(shard["sizes"]), placement=shard["placement"])
            for shard in entry["shards"]
        ])
    options = {}
    for field in ("enforce_hbm", "stochastic_rounding", "bounds_check_mode", "output_dtype"):
        if field in entry:
            options[field] = enums[field][entry[field]] if field in _ENUM_FIELDS else entry[field]
    cache = entry.get("cache_params")
    if cache is not None:
        options["cache_params"] = CacheParams(**{
            field: (enums[field][value] if field in _ENUM_FIELDS else value) for field, value in cache.items()
        })
    return ParameterSharding(
        sharding_type=str(entry["sharding_type"]),
        compute_kernel=str(entry["compute_kernel"]),
        ranks=[int(rank) for rank in entry["ranks"]],
        sharding_spec=spec,
        **options,
    )


# --------------------------------------------------------------------- check


def load_plan_for(
    path: Path,
    config: Config,
    world_size: int,
    device: Optional[torch.device] = None,
    local_world_size: Optional[int] = None,
) -> SavedPlan:
    """Read the plan at ``path`` and check it against the job before anything is trained.

    InputError with one line saying what differs: world size, ranks per host
    (when given), compute device (when given), table names, embedding
    dimension, or rows against ``distributed.table_rows`` when the config sets it.
    """
    saved = read_plan(path)
    where = saved.source
    if saved.world_size != world_size:
        raise InputError(f"{where}: the plan is for world size {saved.world_size}, this job's world size is {world_size}")
    if local_world_size is not None and saved.local_world_size != local_world_size:
        raise InputError(
            f"{where}: the plan is for {saved.local_world_size} ranks per host, this job has {local_world_size}"
        )
    if device is not None and saved.compute_device != torch.device(device).type:
        raise InputError(f"{where}: the plan is for {saved.compute_device}, this job runs on {torch.device(device).type}")

    columns = config_schema(config).sparse
    expected = {table_name(column) for column in columns}
    missing = sorted(expected - set(saved.table_shapes))
    unexpected = sorted(set(saved.table_shapes) - expected)
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"not in the config {', '.join(unexpected)}"] if unexpected else []
        )
        raise InputError(f"{where}: the plan's tables differ from the config's sparse columns: {'; '.join(parts)}")
    for name, (_, dim) in sorted(saved.table_shapes.items()):
        if dim != config.model.embedding_dim:
            raise InputError(f"{where}: table {name} has dim {dim} in the plan, model.embedding_dim is {config.model.embedding_dim}")
    configured = configured_table_rows(config)
    if configured is not None:
        check_table_rows(saved, configured)
    for name, sharding in saved.sharding_plan.plan[SPARSE_MODULE].items():
        bad = [rank for rank in sharding.ranks or [] if not 0 <= rank < world_size]
        if bad:
            raise InputError(f"{where}: table {name} is placed on rank {bad[0]}, outside 0..{world_size - 1}")
    return saved


def check_table_rows(saved: SavedPlan, table_sizes: Dict[str, int]) -> None:
    """InputError unless every table has the rows of ``table_sizes`` (sparse column -> rows)."""
    for column, rows in table_sizes.items():
        name = table_name(column)
        planned = saved.table_shapes.get(name, [None])[0]
        if planned != rows:
            raise InputError(
                f"{saved.source}: table {name} has {planned} rows in the plan, the data gives {rows}; "
                "plan again with these table sizes"
            )
