"""Sharded tables on 2 gloo ranks: same forward as the unsharded model, and one training step.

One spawned job checks table_wise, column_wise and data_parallel in turn, each
with every table sharded that way:

* the unsharded model's weights, saved with torch.distributed.checkpoint from
  one process, load into the 2-rank DistributedModelParallel model, whose
  forward then equals the unsharded forward on each rank's batch;
* data_parallel tables start identical on both ranks although each rank
  seeded its generator differently before sharding;
* one training step moves every weight of a row that the global batch looks
  up by exactly the learning rate, as a first Adagrad step does, and leaves
  the other rows alone. The step runs through TorchRec's train pipeline with
  the fused table optimizer, or the replicated one for data_parallel tables.
  The replicas stay identical.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from dist_helpers import init_worker, spawn

COLUMNS = {"cat_a": 7, "cat_b": 5, "cat_c": 6}
UNTOUCHED_ROWS = 2  # the batches never look up the last rows of each table
NUM_DENSE = 3
NUM_TASKS = 2
BATCH_ROWS = 16
TABLE_LR = 0.05
KINDS = ("table_wise", "column_wise", "data_parallel")


def _model_config():
    from mome_rec.config import ModelConfig

    # "base" has no masks, so no mask entry of 0 can hide an input from the gradient.
    return ModelConfig(embedding_dim=8, over_arch="base", hidden_dims=[16, 8], num_experts=2, tower_dims=[4], dropout=0.0)


def _batch(rank: int, seed: int):
    from mome_rec.data.batches import make_batch
    from mome_rec.data.preprocess import Arrays

    rng = np.random.default_rng([seed, rank])
    sparse = np.stack([rng.integers(0, rows - UNTOUCHED_ROWS, BATCH_ROWS) for rows in COLUMNS.values()], axis=1)
    arrays = Arrays(
        sparse=sparse.astype(np.int64),
        dense=rng.standard_normal((BATCH_ROWS, NUM_DENSE)).astype(np.float32),
        labels=rng.integers(0, 2, (BATCH_ROWS, NUM_TASKS)).astype(np.float32),
    )
    return make_batch(arrays, list(COLUMNS))


def _plan(sparse_arch, kind: str, world_size: int):
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    from mome_rec.planning import SPARSE_MODULE, table_name

    def sharding(index: int):
        if kind == "table_wise":
            return table_wise(rank=index % world_size)
        if kind == "column_wise":
            return column_wise(ranks=list(range(world_size)))
        return data_parallel()

    per_table = {table_name(column): sharding(index) for index, column in enumerate(COLUMNS)}
    module_plan = construct_module_sharding_plan(
        sparse_arch, per_param_sharding=per_table, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    return ShardingPlan({SPARSE_MODULE: module_plan})


def _local_tables(dmp):
    """Return ``{table: [(row offset, column offset, tensor copy), ...]}`` of this rank's shards."""
    tables = {}
    for key, value in dmp.state_dict().items():
        if ".sparse_arch." not in f".{key}":
            continue
        name = key.split(".")[-2]
        if hasattr(value, "local_shards"):
            tables[name] = [
                (shard.metadata.shard_offsets[0], shard.metadata.shard_offsets[1], shard.tensor.detach().clone())
                for shard in value.local_shards()
            ]
        else:
            tables[name] = [(0, 0, value.detach().clone())]
    return tables


def _gather(tensor: torch.Tensor):
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tensor.detach().clone())
    return gathered


def _max_rank_difference(tensor: torch.Tensor) -> float:
    gathered = _gather(tensor)
    return max(float((other - gathered[0]).abs().max()) for other in gathered)


def _check_kind(kind: str, rank: int, world_size: int, reference_dir: Path, reference) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from tqdm import tqdm

    from mome_rec.model import build_model
    from mome_rec.optim import (
        DenseOptimizer,
        OptimizerChain,
        apply_embedding_optimizer,
        build_table_optimizer,
        replicated_table_parameters,
    )
    from mome_rec.train_loop import train_epoch
    from mome_rec.train_module import TrainModule

    # A different seed per rank: identical data_parallel tables must come from TorchRec's broadcast.
    torch.manual_seed(100 + rank)
    model = build_model(_model_config(), COLUMNS, NUM_DENSE, NUM_TASKS, device=torch.device("meta"),
                        dense_device=torch.device("cpu"))
    apply_embedding_optimizer(model.sparse_arch, "adagrad", TABLE_LR)
    dmp = DistributedModelParallel(
        TrainModule(model), env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=torch.device("cpu"),
        plan=_plan(model.sparse_arch, kind, world_size), init_data_parallel=False,
    )
    result = {"initial_rank_difference": {}}
    if kind == "data_parallel":
        for name, shards in _local_tables(dmp).items():
            result["initial_rank_difference"][name] = _max_rank_difference(shards[0][2])

    state = {"model": dmp.state_dict()}
    dcp.load(state, checkpoint_id=str(reference_dir))
    dmp.load_state_dict(state["model"])

    batch = _batch(rank, seed=1)
    dmp.eval()
    reference.eval()
    with torch.no_grad():
        _, (_, logits, _) = dmp(batch)
        _, (_, expected, _) = reference(batch)
    result["forward_max_difference"] = float((logits - expected).abs().max())

    before = _local_tables(dmp)
    task_arch = dmp.module.model.task_arch
    replicated = replicated_table_parameters(dmp)
    optimizer = OptimizerChain([
        DenseOptimizer(task_arch.parameters(), lr=1e-3, buffers=task_arch.buffers()),
        build_table_optimizer("adagrad", list(replicated.values()), TABLE_LR),
    ])
    losses = train_epoch(dmp, optimizer, [_batch(rank, seed=2)], torch.device("cpu"), lambda loss: None,
                         tqdm(disable=True))
    result["losses"] = losses
    result["replicated_tables"] = sorted(replicated)
    result["before"] = before
    result["after"] = _local_tables(dmp)
    dense = torch.cat([tensor.detach().flatten().float() for tensor in list(task_arch.parameters()) + list(task_arch.buffers())])
    result["dense_rank_difference"] = _max_rank_difference(dense)
    if kind == "data_parallel":
        result["final_rank_difference"] = {
            name: _max_rank_difference(shards[0][2]) for name, shards in result["after"].items()
        }
    return result


def sharding_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from mome_rec.model import build_model
    from mome_rec.train_module import TrainModule

    init_worker(rank, world_size, port)
    torch.manual_seed(0)
    reference = TrainModule(build_model(_model_config(), COLUMNS, NUM_DENSE, NUM_TASKS, device=torch.device("cpu")))
    reference_dir = out_dir / "reference"
    if rank == 0:
        dcp.save({"model": reference.state_dict()}, checkpoint_id=str(reference_dir), no_dist=True)
    dist.barrier()

    results = {kind: _check_kind(kind, rank, world_size, reference_dir, reference) for kind in KINDS}
    torch.save(results, out_dir / f"rank_{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharding")
    spawn(sharding_worker, 2, out_dir)
    return [torch.load(out_dir / f"rank_{rank}.pt", weights_only=False) for rank in range(2)]


def _touched_rows(column_index: int) -> set:
    """Rows of one table that either rank's training batch looks up."""
    rows = set()
    for rank in range(2):
        values = _batch(rank, seed=2).sparse_features.values().view(len(COLUMNS), BATCH_ROWS)
        rows.update(int(row) for row in values[column_index])
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_forward_equals_unsharded(results, kind):
    for rank in range(2):
        assert results[rank][kind]["forward_max_difference"] < 1e-6, f"rank {rank}"


def test_data_parallel_tables_start_identical(results):
    differences = results[0]["data_parallel"]["initial_rank_difference"]
    assert set(differences) == {f"t_{column}" for column in COLUMNS}
    assert all(value == 0.0 for value in differences.values()), differences


@pytest.mark.parametrize("kind", KINDS)
def test_step_moves_looked_up_rows_by_lr(results, kind):
    """The first Adagrad step is ``w -= lr * g / (sqrt(g**2) + eps)``, a move of ``lr`` wherever ``g != 0``."""
    for column_index, column in enumerate(COLUMNS):
        name = f"t_{column}"
        touched = _touched_rows(column_index)
        seen_rows = set()
        for rank in range(2):
            for (row_offset, _, old), (_, _, new) in zip(results[rank][kind]["before"][name], results[rank][kind]["after"][name]):
                change = (new - old).abs()
                for local_row in range(old.shape[0]):
                    row = row_offset + local_row
                    seen_rows.add(row)
                    if row in touched:
                        assert torch.allclose(change[local_row], torch.full_like(change[local_row], TABLE_LR), rtol=1e-3), (
                            f"{kind} {name} row {row} on rank {rank}: {change[local_row].tolist()}"
                        )
                    else:
                        assert float(change[local_row].max()) == 0.0, f"{kind} {name} row {row} on rank {rank}"
        assert seen_rows == set(range(COLUMNS[column])), f"{kind} {name}: shards cover rows {sorted(seen_rows)}"


def test_only_data_parallel_tables_use_replicated_optimizer(results):
    assert results[0]["table_wise"]["replicated_tables"] == []
    assert results[0]["column_wise"]["replicated_tables"] == []
    assert results[0]["data_parallel"]["replicated_tables"] == [
        f"model.sparse_arch.embedding_bags.t_{column}.weight" for column in COLUMNS
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_replicas_identical_after_step(results, kind):
    assert results[0][kind]["dense_rank_difference"] == 0.0
    if kind == "data_parallel":
        assert all(value == 0.0 for value in results[0][kind]["final_rank_difference"].values())


def test_step_loss_is_mean_over_ranks(results):
    losses = [results[rank]["table_wise"]["losses"] for rank in range(2)]
    assert len(losses[0]) == 1
    assert losses[0] == losses[1]
