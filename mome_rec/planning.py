"""Sharding plans for the embedding tables, from TorchRec's EmbeddingShardingPlanner.

The planner plans the module that training shards: the ranking model with
its tables on the ``meta`` device and the table optimizer attached, so that its
storage estimate counts the optimizer state. Per-table constraints come from
``distributed.tables`` in the config. :func:`plan_offline` needs no process
group and no accelerator, so a CPU machine can plan for a GPU cluster.

Example::

    plan, report = plan_offline(config, {"categorical_1": 12, ...}, num_dense=63, num_tasks=2,
                                world_size=16, local_world_size=8, compute_device="cuda")
    print(format_report(report))
"""

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, ShardingOption, Stats
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingPlan, ShardingType

from mome_rec.config import Config
from mome_rec.errors import ConfigError, InputError, first_line
from mome_rec.model import build_model
from mome_rec.optim import apply_embedding_optimizer, embedding_optimizer_name
from mome_rec.train_module import TrainModule

logger = logging.getLogger(__name__)

SHARDING_TYPES = tuple(kind.value for kind in ShardingType)
COMPUTE_KERNELS = tuple(kernel.value for kernel in EmbeddingComputeKernel)
COMPUTE_DEVICES = ("cpu", "cuda")
SPARSE_MODULE = "model.sparse_arch"
"""Path of the EmbeddingBagCollection inside the module DistributedModelParallel wraps."""


def table_name(column: str) -> str:
    """Return the name of the embedding table of the sparse column ``column``."""
    return f"t_{column}"


def table_constraints(config: Config, columns: Optional[List[str]] = None) -> Dict[str, ParameterConstraints]:
    """Return planner constraints keyed by table name, from ``distributed.tables`` in the config.

    ConfigError for an unknown sharding type or compute kernel, or for a column
    that is not in ``columns`` (the sparse columns) when they are given.
    """
    constraints = {}
    for column, table in config.distributed.tables.items():
        key = f"distributed.tables.{column}"
        if columns is not None and column not in columns:
            raise ConfigError(f"{key}: {column} is not a sparse column (sparse columns: {', '.join(columns)})")
        for kind in table.sharding_types:
            if kind not in SHARDING_TYPES:
                raise ConfigError(f"{key}.sharding_types: unknown sharding type {kind!r} (known: {', '.join(SHARDING_TYPES)})")
        for kernel in table.compute_kernels:
            if kernel not in COMPUTE_KERNELS:
                raise ConfigError(f"{key}.compute_kernels: unknown compute kernel {kernel!r} (known: {', '.join(COMPUTE_KERNELS)})")
        constraints[table_name(column)] = ParameterConstraints(
            sharding_types=list(table.sharding_types) or None,
            compute_kernels=list(table.compute_kernels) or None,
        )
    return constraints


def make_planner(
    config: Config,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    batch_size: Optional[int] = None,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    columns: Optional[List[str]] = None,
    stats: Optional[Stats] = None,
) -> EmbeddingShardingPlanner:
    """Build a planner for ``world_size`` ranks of ``compute_device``, ``local_world_size`` per host.

    ``hbm_gb`` and ``ddr_gb`` are the accelerator and host memory per rank in
    GiB (TorchRec's defaults when None); ``batch_size`` is per rank and
    defaults to ``train.batch_size``.
    """
    if compute_device not in COMPUTE_DEVICES:
        raise InputError(f"compute device must be one of {', '.join(COMPUTE_DEVICES)}, got {compute_device!r}")
    if world_size < 1 or not 1 <= local_world_size <= world_size or world_size % local_world_size:
        raise InputError(
            f"world size {world_size} and local world size {local_world_size} do not describe whole hosts "
            "(need 1 <= local <= world and world divisible by local)"
        )
    topology_args = {}
    if hbm_gb is not None:
        topology_args["hbm_cap"] = int(hbm_gb * 1024**3)
    if ddr_gb is not None:
        topology_args["ddr_cap"] = int(ddr_gb * 1024**3)
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        **topology_args,
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size or config.train.batch_size,
        constraints=table_constraints(config, columns),
        stats=stats,
    )


def planning_module(
    config: Config, table_sizes: Dict[str, int], num_dense: int, num_tasks: int, compute_device: str
) -> TrainModule:
    """Return the module to plan for: tables on ``meta`` with the table optimizer that ``compute_device`` runs."""
    model = build_model(
        config.model, table_sizes, num_dense, num_tasks, device=torch.device("meta"), dense_device=torch.device("cpu")
    )
    optimizer = embedding_optimizer_name(config.train.embedding_optimizer, torch.device(compute_device))
    apply_embedding_optimizer(model.sparse_arch, optimizer, config.train.embedding_lr)
    return TrainModule(model)


def collective_plan(
    module: torch.nn.Module, config: Config, device: torch.device, local_world_size: int,
    columns: Optional[List[str]] = None,
) -> ShardingPlan:
    """Plan on rank 0 for the live process group and share the plan with every rank.

    ``columns`` (the sparse columns) lets a constraint on an unknown column raise ConfigError.
    """
    planner = make_planner(config, dist.get_world_size(), local_world_size, device.type, columns=columns)
    try:
        return planner.collective_plan(module, get_default_sharders(), dist.GroupMember.WORLD)
    except (PlannerError, RuntimeError) as error:  # RuntimeError: no kernel fits a table's constraints
        raise InputError(f"sharding planner failed: {first_line(error)}") from error


# ------------------------------------------------------------------ offline


@dataclasses.dataclass
class TablePlacement:
    """Placement of one table in a plan: its sharding type, compute kernel and ranks."""

    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: List[int]


@dataclasses.dataclass
class RankEstimate:
    """The planner's estimates for one rank: table storage in bytes and step time in ms."""

    rank: int
    table_hbm_bytes: int
    table_ddr_bytes: int
    reserved_hbm_bytes: int
    reserved_ddr_bytes: int
    perf_ms: float


@dataclasses.dataclass
class PlanReport:
    """Summary of a plan, as :func:`format_report` prints it."""

    world_size: int
    local_world_size: int
    compute_device: str
    batch_size: int
    tables: List[TablePlacement]
    ranks: List[RankEstimate]


class _ReportCollector(Stats):
    """A planner ``Stats`` that keeps the chosen sharding options for :class:`PlanReport`."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []
        self.reserved_hbm = 0
        self.reserved_ddr = 0

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time,
            best_plan, constraints=None, sharders=None, enumerator=None, debug=False, debug_stats=None) -> None:
        self.best_plan = list(best_plan)
        # NOTE: TorchRec keeps the dense and input reservations in private attributes of its
        # HeuristicalStorageReservation (torchrec 1.8.0); other reservations report 0 here.
        for attribute in ("_dense_storage", "_kjt_storage"):
            storage = getattr(storage_reservation, attribute, None)
            if storage is not None:
                self.reserved_hbm += storage.hbm
                self.reserved_ddr += storage.ddr


def plan_offline(
    config: Config,
    table_sizes: Dict[str, int],
    num_dense: int,
    num_tasks: int,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    batch_size: Optional[int] = None,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
) -> Tuple[ShardingPlan, PlanReport]:
    """Plan the tables ``table_sizes`` (sparse column -> rows) without a process group.

    Returns the plan and the planner's per-table placement and per-rank estimates.
    InputError when no plan fits (one line from the planner's error).
    """
    collector = _ReportCollector()
    planner = make_planner(
        config, world_size, local_world_size, compute_device, batch_size, hbm_gb, ddr_gb,
        columns=list(table_sizes), stats=collector,
    )
    module = planning_module(config, table_sizes, num_dense, num_tasks, compute_device)
    try:
        plan = planner.plan(module, get_default_sharders())
    except (PlannerError, RuntimeError) as error:  # RuntimeError: no kernel fits a table's constraints
        raise InputError(f"sharding planner failed for {world_size} x {compute_device}: {first_line(error)}") from error

    order = {table_name(column): index for index, column in enumerate(table_sizes)}
    tables = []
    for option in sorted(collector.best_plan, key=lambda option: order.get(option.name, len(order))):
        rows, dim = option.tensor.shape
        ranks = sorted({shard.rank for shard in option.shards})
        tables.append(TablePlacement(option.name, int(rows), int(dim), option.sharding_type, option.compute_kernel, ranks))
    ranks = [
        RankEstimate(rank, 0, 0, collector.reserved_hbm, collector.reserved_ddr, 0.0) for rank in range(world_size)
    ]
    for option in collector.best_plan:
        for shard in option.shards:
            estimate = ranks[shard.rank]
            estimate.table_hbm_bytes += shard.storage.hbm
            estimate.table_ddr_bytes += shard.storage.ddr
            estimate.perf_ms += shard.perf.total
    report = PlanReport(world_size, local_world_size, compute_device, batch_size or config.train.batch_size, tables, ranks)
    return plan, report


def format_report(report: PlanReport) -> str:
    """Return the report as two text tables: one row per table, then one row per rank."""
    lines = [
        f"plan for {report.world_size} x {report.compute_device} ({report.local_world_size} per host), "
        f"batch size {report.batch_size} per rank",
        "",
        f"{'table':<24} {'rows':>10} {'dim':>5}  {'sharding type':<14} {'compute kernel':<18} ranks",
    ]
    for table in report.tables:
        lines.append(
            f"{table.name:<24} {table.rows:>10} {table.dim:>5}  {table.sharding_type:<14} "
            f"{table.compute_kernel:<18} {_format_ranks(table.ranks)}"
        )
    memory = "HBM" if report.compute_device == "cuda" else "DDR"
    lines += [
        "",
        f"{'rank':>4}  {'tables HBM MiB':>14} {'tables DDR MiB':>14} {'total ' + memory + ' MiB':>15} {'perf ms':>9}",
    ]
    for rank in report.ranks:
        total = rank.table_hbm_bytes + rank.reserved_hbm_bytes
        if memory == "DDR":
            total = rank.table_ddr_bytes + rank.reserved_ddr_bytes
        lines.append(
            f"{rank.rank:>4}  {_mib(rank.table_hbm_bytes):>14} {_mib(rank.table_ddr_bytes):>14} "
            f"{_mib(total):>15} {rank.perf_ms:>9.4f}"
        )
    lines.append(
        f"total {memory} adds the planner's reservation for the dense part and inputs "
        f"({_mib(report.ranks[0].reserved_hbm_bytes if memory == 'HBM' else report.ranks[0].reserved_ddr_bytes)} MiB per rank); "
        "perf is the planner's estimate of one step's embedding time on that rank"
    )
    return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.3f}"


def _format_ranks(ranks: List[int]) -> str:
    """Return ``[0, 1, 2, 5]`` as ``0-2,5``."""
    pieces = []
    start = previous = None
    for rank in ranks + [None]:
        if rank is not None and previous is not None and rank == previous + 1:
            previous = rank
            continue
        if start is not None:
            pieces.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = rank
    return ",".join(pieces)
