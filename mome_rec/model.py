"""The ranking model: TorchRec embedding tables, an over-arch and one tower per task.

    features = [pooled embeddings (B x F*D), dense features (B x num_dense)]
    logits[:, t] = tower_t(over_arch(features)[t])

``sparse_arch`` is a plain ``EmbeddingBagCollection`` so that
DistributedModelParallel can shard it; everything else is the dense part.
"""

import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from mome_rec.config import ModelConfig
from mome_rec.errors import DataError
from mome_rec.modules.over_arch import OverArch, build_over_arch
from mome_rec.modules.tower import Tower

logger = logging.getLogger(__name__)


class TaskArch(nn.Module):
    """The dense part above the embeddings: over-arch, then one tower per task.

    Kept as one module so that TorchRec's train pipeline, which traces the model
    with every module free of sharded tables as a leaf, sees a single call that
    returns the ``B x T`` logits.
    """

    def __init__(self, over_arch: OverArch, towers: nn.ModuleList) -> None:
        super().__init__()
        if len(towers) != over_arch.num_tasks:
            raise ValueError(f"TaskArch: {len(towers)} towers for {over_arch.num_tasks} tasks")
        self.over_arch = over_arch
        self.towers = towers

    def forward(self, features: Tensor) -> Tensor:
        """Map ``B x in_features`` to logits ``B x T``."""
        representations = self.over_arch(features)
        return torch.stack([tower(rep) for tower, rep in zip(self.towers, representations)], dim=1)


class RankingModel(nn.Module):
    """Multi-task ranking model: sum-pooled embeddings and dense features -> over-arch -> towers.

    Args:
        tables: one embedding table config per sparse feature, in feature order.
        num_dense: number of dense features.
        over_arch: maps ``B x (sum of embedding dims + num_dense)`` to one representation per task.
        towers: one tower per task, each mapping ``B x over_arch.output_dim`` to ``B`` logits.
        device: device of the embedding tables; ``meta`` defers allocation to
            DistributedModelParallel. The over-arch and towers stay where they are.

    Example::

        model = RankingModel(tables, num_dense=3, over_arch=over_arch, towers=towers)
        logits = model(dense_features, sparse_features)  # B x T
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        num_dense: int,
        over_arch: OverArch,
        towers: nn.ModuleList,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        in_features = sum(table.embedding_dim * len(table.feature_names) for table in tables) + num_dense
        if in_features != over_arch.in_features:
            raise ValueError(f"RankingModel: the over-arch takes {over_arch.in_features} features, the inputs give {in_features}")
        self.tables = list(tables)
        self.feature_names = [name for table in self.tables for name in table.feature_names]
        self.num_dense = num_dense
        self.sparse_arch = EmbeddingBagCollection(tables=self.tables, device=device)
        self.task_arch = TaskArch(over_arch, towers)

    @property
    def over_arch(self) -> OverArch:
        return self.task_arch.over_arch

    @property
    def towers(self) -> nn.ModuleList:
        return self.task_arch.towers

    def forward(self, dense_features: Tensor, sparse_features: KeyedJaggedTensor) -> Tensor:
        """Return the logits, ``B x T``, of a batch with ``B x num_dense`` dense features."""
        # A sharded EmbeddingBagCollection returns its keys grouped by sharding type and rank,
        # so the pooled embeddings are concatenated by name, in table order.
        pooled = self.sparse_arch(sparse_features)
        features = torch.cat([pooled[name] for name in self.feature_names] + [dense_features], dim=1)
        return self.task_arch(features)


def build_model(
    model_cfg: ModelConfig,
    table_sizes: Dict[str, int],
    num_dense: int,
    num_tasks: int,
    device: Optional[torch.device] = None,
    dense_device: Optional[torch.device] = None,
) -> RankingModel:
    """Build the ranking model that ``model_cfg`` describes.

    Args:
        model_cfg: the ``model`` section of the config.
        table_sizes: sparse column -> number of embeddings; the insertion order is the feature order.
        num_dense: number of dense features.
        num_tasks: number of tasks (label columns).
        device: device of the embedding tables (``meta`` to let DistributedModelParallel allocate them).
        dense_device: device of the over-arch and towers; defaults to ``device``, or the CPU when
            ``device`` is ``meta``.

    Each sparse column ``c`` gets a table ``t_c`` with feature name ``c``.
    """
    if num_tasks < 1:
        raise ValueError(f"build_model: need at least one task, got {num_tasks}")
    for column, size in table_sizes.items():
        if size < 1:
            raise DataError(f"sparse column {column}: the embedding table needs at least 1 row, got {size}")
    if dense_device is None and device is not None and torch.device(device).type != "meta":
        dense_device = torch.device(device)

    tables = [
        EmbeddingBagConfig(
            name=f"t_{column}",
            embedding_dim=model_cfg.embedding_dim,
            num_embeddings=size,
            feature_names=[column],
        )
        for column, size in table_sizes.items()
    ]
    in_features = len(tables) * model_cfg.embedding_dim + num_dense
    over_arch = build_over_arch(model_cfg.over_arch, in_features, num_tasks, model_cfg)
    towers = nn.ModuleList(
        Tower(over_arch.output_dim, model_cfg.tower_dims, model_cfg.dropout, model_cfg.batch_norm)
        for _ in range(num_tasks)
    )
    if dense_device is not None:
        over_arch.to(dense_device)
        towers.to(dense_device)
    logger.info("model: %d tables, %d dense features, over-arch %s, %d tasks", len(tables), num_dense, model_cfg.over_arch, num_tasks)
    return RankingModel(tables, num_dense, over_arch, towers, device=device)


def multitask_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``mean_t mean_b BCE(logits[b, t], labels[b, t])``, the binary cross-entropy averaged per task, then over tasks.

    Args:
        logits: ``B x T``.
        labels: ``B x T`` of 0/1 values (any numeric dtype).
    """
    if logits.shape != labels.shape:
        raise ValueError(f"multitask_loss: logits {list(logits.shape)} and labels {list(labels.shape)} differ in shape")
    per_entry = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return per_entry.mean(dim=0).mean()
