"""The module DistributedModelParallel wraps: a ranking model plus its loss."""

from typing import Tuple

import torch
from torchrec.datasets.utils import Batch

from mome_rec.model import RankingModel, multitask_loss

# TorchRec's train pipeline traces this module with torch.fx to find the sharded
# lookups; the loss and the regularization hold Python control flow, so the
# tracer records them as opaque calls.
torch.fx.wrap("multitask_loss")
torch.fx.wrap("regularization_of")


def regularization_of(model: RankingModel) -> torch.Tensor:
    return model.over_arch.regularization()


class TrainModule(torch.nn.Module):
    """Compute ``mean_t BCE_t + regularization`` for a Batch, as TorchRec's train pipelines expect.

    ``forward`` returns ``(loss, (loss, logits, labels))`` with the last three
    detached; logits are ``B x T``. The over-arch's regularization (the L0
    penalty for MoME) is added in training mode only.
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = multitask_loss(logits, batch.labels)
        if self.training:
            loss = loss + regularization_of(self.model)
        return loss, (loss.detach(), logits.detach(), batch.labels)
