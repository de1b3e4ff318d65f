"""Sharding plans for the embedding tables, from torchrec's EmbeddingShardingPlanner."""

import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan

from mome_rec.config import Config

logger = logging.getLogger(__name__)


def table_name(column: str) -> str:
    """Name of the embedding table that holds the sparse column ``column``."""
    return f"t_{column}"


def table_constraints(config: Config) -> Dict[str, ParameterConstraints]:
    """Planner constraints keyed by table name, from ``distributed.tables`` in the config."""
    constraints = {}
    for column, table in config.distributed.tables.items():
        constraints[table_name(column)] = ParameterConstraints(
            sharding_types=table.sharding_types or None,
            compute_kernels=table.compute_kernels or None,
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
) -> EmbeddingShardingPlanner:
    """Build a planner for a cluster of ``world_size`` ranks of ``compute_device``."""
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
        constraints=table_constraints(config),
    )


def collective_plan(model: torch.nn.Module, config: Config, device: torch.device, local_world_size: int) -> ShardingPlan:
    """Plan on rank 0 for the live process group and share the plan with every rank."""
    planner = make_planner(config, dist.get_world_size(), local_world_size, device.type)
    return planner.collective_plan(model, pg=dist.GroupMember.WORLD)
